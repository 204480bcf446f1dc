"""
The benchmark harness still runs end to end: ``bench/run.py --quick`` is a
smoke check, never a timing assertion.  It checks that every phase produced
its figures for both subjects, that the stickiness check ran and passed, and
that the ratio table was written.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    # The harness is a CPython 3.11 program (it measures PyPy as a subject,
    # proxymap-pypy); CI's CPython pass runs this test.
    pytest.mark.skipif(
        sys.version_info < (3, 11) or platform.python_implementation() != "CPython",
        reason="bench/run.py runs on CPython 3.11+",
    ),
]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "run.py"

EXPECTED = {
    "keep-alive req/s c32",
    "one request per connection req/s",
    "one request per connection, client closes req/s",
    "c1 latency p50 us",
    "c1 latency p99 us",
    "CONNECT setups/s",
    "tunnel bulk bytes/s",
    "bytes per idle tunnel",
    "idle tunnels held",
    "probe p99 with tunnels / without",
    "twin: probe p99 with tunnels / without",
    "probe p99 with tunnels / without, over the twin's",
    "bytes per listening port",
    "bytes per listening port, 51 to 251",
    "1 port up s (process start to listening)",
    "traffic over 50 ports / one port",
    "time added per request over 50 ports us",
    "keep-alive req/s c50, one port",
    "keep-alive req/s c50, 50 ports",
    "keep-alive traffic over 50 ports / one port",
    "keep-alive time added per request over 50 ports us",
}


def test_quick_run_measures_every_phase(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--quick",
            "--subjects",
            "reference,proxymap,direct",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '{"stickiness": "ok", "ports": 50}' in proc.stdout
    (jsonl,) = tmp_path.glob("run-*.jsonl")
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for subject in ("reference", "proxymap"):
        seen = {line["metric"] for line in lines if line["subject"] == subject}
        assert EXPECTED <= seen, (subject, EXPECTED - seen)
        held = [
            line["value"]
            for line in lines
            if line["subject"] == subject and line["metric"] == "idle tunnels held"
        ]
        assert held == [250]
    direct = {line["metric"] for line in lines if line["subject"] == "direct"}
    assert "keep-alive req/s c32" in direct
    (table,) = tmp_path.glob("run-*.md")
    assert "proxymap / reference" in table.read_text().splitlines()[0]
