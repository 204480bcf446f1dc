#!/usr/bin/env python3
"""
A quick throughput probe: wrk through one proxymap port to the sandbox
vendor, against wrk straight to the sandbox vendor, in the same run.

    python bench/quick.py [--seconds 10] [--connections 32]

proxymap runs pinned to core 0; the sandbox vendor and wrk share core 1, so
proxymap's own cost is what the ratio measures.  Everything listens on
127.0.0.1 and every process started here is stopped here.  Results go to
bench/results/quick-<time>.json (one JSON object a line) and to stdout.

Not a test: numbers depend on the machine.  The full harness (peers, a bare
Twisted reference, CONNECT and memory) is issue 8's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import free_ports, stop_all, wait_port, wrk  # noqa: E402

LUA = """
wrk.method = "GET"
wrk.path = "http://ip.sandbox/json"
wrk.headers["Proxy-Authorization"] = "%s"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (apt-get install wrk util-linux)")

    import base64

    sandbox_port, proxy_port = free_ports(2)
    work = Path(tempfile.mkdtemp(prefix="proxymap-bench-"))
    config = work / "proxymap.toml"
    config.write_text(
        f'[admin]\nlisten = ""\n[[mapping]]\nname = "bench"\nports = [{proxy_port}]\n'
        f'upstream = "http://127.0.0.1:{sandbox_port}"\nuser = "demo"\npass = "demo-secret"\n'
        'lifetime = "1h"\n'
    )
    direct_auth = "Basic " + base64.b64encode(b"demo-session-direct:demo-secret").decode()
    via = work / "via.lua"
    via.write_text(LUA % "Basic Y2xpZW50Om9ubHk=")  # the client's own: must not go upstream
    direct = work / "direct.lua"
    direct.write_text(LUA % direct_auth)

    procs = [
        subprocess.Popen(
            [
                "taskset",
                "-c",
                "1",
                sys.executable,
                "-m",
                "proxymap.sandbox",
                "--port",
                str(sandbox_port),
                "--quiet",
            ]
        ),
        subprocess.Popen(
            [
                "taskset",
                "-c",
                "0",
                sys.executable,
                "-m",
                "twisted",
                "proxymap",
                "--config",
                str(config),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=work,
        ),
    ]
    results = []
    try:
        wait_port(sandbox_port)
        wait_port(proxy_port)
        for close in (False, True):
            name = "one request per connection" if close else f"keep-alive c{args.connections}"
            # Interleave A B A B A B and keep medians.
            through, straight = [], []
            for _ in range(3):
                through.append(wrk(proxy_port, via, args.seconds, args.connections, close))
                straight.append(wrk(sandbox_port, direct, args.seconds, args.connections, close))
            row = {
                "metric": name,
                "proxymap_rps": sorted(through)[1],
                "direct_to_sandbox_rps": sorted(straight)[1],
            }
            row["ratio"] = round(row["proxymap_rps"] / row["direct_to_sandbox_rps"], 3)
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        stop_all(procs)
        shutil.rmtree(work, ignore_errors=True)
    out = HERE / "results" / time.strftime("quick-%Y%m%dT%H%M%S.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in results))
    print(f"written to {out.relative_to(HERE.parent)}")
    os.sync()


if __name__ == "__main__":
    main()
