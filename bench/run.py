#!/usr/bin/env python3
"""
proxymap against the bare Twisted reference, in one run.

    python bench/run.py [--seconds 8] [--connections 32]

The terminal fake parent (bench/parent.py) and wrk share core 1; the subject
under test (bench/reference.py, then proxymap, interleaved A B A B A B) runs
alone on core 0.  Reports medians of three as JSON lines and a Markdown table
of ratios in bench/results/, and checks stickiness from the parent's counts:
every port only ever sent its own session username.

This is the first part of issue 8's harness: peers (pproxy, tinyproxy,
squid), CONNECT load and memory figures are still to come.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import free_ports, stop_all, wait_port, wrk  # noqa: E402

LUA = 'wrk.method = "GET"\nwrk.path = "http://bench.parent/"\n'


def start(argv: list[str], core: int, **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["taskset", "-c", str(core), *argv], **kw)  # type: ignore[call-overload]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="proxymap-bench-"))
    script = work / "get.lua"
    script.write_text(LUA)
    parent_port, reference_port, proxymap_port = free_ports(3)
    config = work / "proxymap.toml"
    config.write_text(
        f'[admin]\nlisten = ""\n[[mapping]]\nports = [{proxymap_port}]\n'
        f'upstream = "http://127.0.0.1:{parent_port}"\nuser = "bench"\npass = "pw"\n'
        'lifetime = "1h"\n'
    )
    parent = start(
        [sys.executable, str(HERE / "parent.py"), str(parent_port), "bench", "pw"],
        1,
        stdout=subprocess.PIPE,
    )
    subjects = {
        "reference": (
            [
                sys.executable,
                str(HERE / "reference.py"),
                str(reference_port),
                "1",
                str(parent_port),
                "bench",
                "pw",
            ],
            reference_port,
        ),
        "proxymap": (
            [sys.executable, "-m", "twisted", "proxymap", "--config", str(config)],
            proxymap_port,
        ),
    }
    results: dict[tuple[str, str], list[float]] = {}
    try:
        wait_port(parent_port)
        for _ in range(3):
            for name, (argv, port) in subjects.items():
                proc = start(
                    argv, 0, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work
                )
                try:
                    wait_port(port)
                    for close in (False, True):
                        metric = (
                            "one request per connection"
                            if close
                            else (f"keep-alive c{args.connections}")
                        )
                        rps = wrk(port, script, args.seconds, args.connections, close)
                        results.setdefault((name, metric), []).append(rps)
                finally:
                    stop_all([proc])
    finally:
        stop_all([parent])
    counts = json.loads(parent.stdout.read() or b"{}")  # type: ignore[union-attr]
    sticky = sorted(counts)
    rows = []
    for metric in (f"keep-alive c{args.connections}", "one request per connection"):
        ref = sorted(results[("reference", metric)])[1]
        ours = sorted(results[("proxymap", metric)])[1]
        rows.append(
            {
                "metric": metric,
                "reference_rps": ref,
                "proxymap_rps": ours,
                "ratio": round(ours / ref, 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    # One port each: the reference's fixed username, and one session per
    # proxymap process (3 runs): anything more means a port was not sticky.
    print(json.dumps({"usernames_seen_by_parent": sticky}))
    assert len(sticky) == 1 + 3, sticky
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"run-{stamp}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = [
        "| metric | reference req/s | proxymap req/s | proxymap / reference |",
        "|---|---|---|---|",
    ]
    table += [
        f"| {r['metric']} | {r['reference_rps']:.0f} | {r['proxymap_rps']:.0f} | {r['ratio']:.2f} |"
        for r in rows
    ]
    (out / f"run-{stamp}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
