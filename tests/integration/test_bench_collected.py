"""
bench/collected.py, which the harness runs its PyPy subjects under: asked
by SIGUSR2, the program it runs reports its RSS and, on PyPy, the heap its
objects keep after a full collection.  CI runs this on CPython and on PyPy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

COLLECTED = Path(__file__).resolve().parents[2] / "bench" / "collected.py"

# Keeps what it is told to keep, one line at a time.
KEEPER = """\
import sys
kept = []
print("ready", *sys.argv[1:], flush=True)
for line in sys.stdin:
    kept.extend(bytearray(100) for _ in range(int(line)))
    print("kept", len(kept), flush=True)
"""


def ask(proc: subprocess.Popen[str], where: Path) -> dict[str, Any]:
    report = where / f"{proc.pid}.json"
    report.unlink(missing_ok=True)
    os.kill(proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not report.exists():
        assert proc.poll() is None, "the program died"
        assert time.monotonic() < deadline, "no report in 30 s"
        time.sleep(0.02)
    found: dict[str, Any] = json.loads(report.read_text())
    return found


@pytest.mark.parametrize("form", ["path", "module"])
def test_reports_what_the_program_keeps(tmp_path: Path, form: str) -> None:
    (tmp_path / "keeper.py").write_text(KEEPER)
    program = [str(tmp_path / "keeper.py")] if form == "path" else ["-m", "keeper"]
    env = dict(os.environ, BENCH_HEAP_DIR=str(tmp_path), PYTHONPATH=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, str(COLLECTED), *program, "one", "two"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        # The program sees its own arguments, as if run directly.
        assert proc.stdout.readline() == "ready one two\n"
        before = ask(proc, tmp_path)
        proc.stdin.write("50000\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "kept 50000\n"
        after = ask(proc, tmp_path)
    finally:
        proc.kill()
        proc.wait()
    assert before["rss"] > 0
    if sys.implementation.name == "pypy":
        # 50,000 objects of 100 bytes and more each stay alive.
        assert after["heap"] - before["heap"] >= 50_000 * 100
    else:
        assert before["heap"] is None and after["heap"] is None
        # CPython frees by reference count: RSS shows what is kept.
        assert after["rss"] - before["rss"] >= 50_000 * 100
