#!/usr/bin/env python3
"""
Soak: rounds of mixed traffic with injected faults over many ports, then
proxymap's open file descriptors and RSS compared with their baseline; then
many idle tunnels held open while requests are still served.

    python bench/soak.py [--rounds 30] [--ports 50] [--idle-tunnels 3000]

proxymap, the sandbox vendor and an echo server run as separate processes on
127.0.0.1; every process started here is stopped here, every loop is
bounded.  Exits non-zero if fds or RSS did not come back near the baseline,
if proxymap logged a failure, or if a request failed while tunnels were held.
Not part of the test run: it takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_ports, free_range, stop_all, wait_listening

ECHO = """
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(4096); print(s.getsockname()[1], flush=True)
def serve(c):
    try:
        while data := c.recv(65536):
            c.sendall(data)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def recv_until(s: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while marker not in data and len(data) < limit:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def http_get(port: int) -> bool:
    with connect(port) as s:
        s.sendall(
            b"GET http://ip.sandbox/ HTTP/1.1\r\nHost: ip.sandbox\r\n\r\n"
            b"GET http://ip.sandbox/ HTTP/1.1\r\nHost: ip.sandbox\r\nConnection: close\r\n\r\n"
        )
        data = recv_until(s, b"\x00never")
    return data.count(b"HTTP/1.1 200") == 2


def tunnel(port: int, echo: int, half_close: bool) -> bool:
    with connect(port) as s:
        s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % echo)
        if not recv_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 200"):
            return False
        payload = os.urandom(random.randint(1, 200_000))
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got == payload


def socks5(port: int, echo: int) -> bool:
    with connect(port) as s:
        s.sendall(b"\x05\x01\x00")
        if s.recv(2) != b"\x05\x00":
            return False
        s.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo.to_bytes(2, "big"))
        if recv_exact(s, 10)[:2] != b"\x05\x00":
            return False
        s.sendall(b"ping")
        return recv_exact(s, 4) == b"ping"


def fault(port: int, echo: int, kind: str) -> None:
    s = connect(port)
    try:
        if kind == "abort-mid-tunnel":
            s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % echo)
            recv_until(s, b"\r\n\r\n")
            s.sendall(os.urandom(50_000))
        elif kind == "partial-head":
            s.sendall(b"GET http://ip.sandbox/ HTTP/1.1\r\nHost: ip")
        elif kind == "garbage":
            s.sendall(os.urandom(300))
        elif kind == "abort-mid-request":
            s.sendall(b"POST http://ip.sandbox/ HTTP/1.1\r\nContent-Length: 100000\r\n\r\nxx")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    finally:
        s.close()  # with SO_LINGER 0: a reset, as a crashing client would


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--ports", type=int, default=50)
    parser.add_argument("--idle-tunnels", type=int, default=3000)
    args = parser.parse_args()
    rng_seed = int(time.time())
    random.seed(rng_seed)

    work = Path(tempfile.mkdtemp(prefix="proxymap-soak-"))
    ports = free_range(args.ports)
    sandbox_port = next(p for p in free_ports(4) if p not in ports)
    config = work / "proxymap.toml"
    config.write_text(
        f'[admin]\nlisten = ""\n[limits]\nmax_connections = 19000\n'
        f'max_connections_per_port = 19000\n[[mapping]]\nports = "{ports[0]}-{ports[-1]}"\n'
        f'upstream = "http://127.0.0.1:{sandbox_port}"\nuser = "demo"\npass = "demo-secret"\n'
    )
    log = (work / "proxymap.log").open("wb")
    procs = []
    try:
        echo_proc = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE)
        procs.append(echo_proc)
        echo = int(echo_proc.stdout.readline())  # type: ignore[union-attr]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "proxymap.sandbox", "--port", str(sandbox_port), "--quiet"]
            )
        )
        proxymap = subprocess.Popen(
            [sys.executable, "-m", "twisted", "proxymap", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=work,
        )
        procs.append(proxymap)
        wait_listening([sandbox_port, ports[-1]])

        failures = 0
        for port in ports:  # warm-up: every port has a session
            failures += not http_get(port)
        time.sleep(1)
        base_fds, base_rss = fds(proxymap.pid), rss(proxymap.pid)

        kinds = ["abort-mid-tunnel", "partial-head", "garbage", "abort-mid-request"]
        started = time.monotonic()
        for _ in range(args.rounds):
            for port in random.sample(ports, min(10, len(ports))):
                failures += not http_get(port)
                failures += not tunnel(port, echo, half_close=random.random() < 0.5)
                failures += not socks5(port, echo)
                fault(port, echo, random.choice(kinds))
        time.sleep(2)
        end_fds, end_rss = fds(proxymap.pid), rss(proxymap.pid)
        soak_seconds = time.monotonic() - started

        held = []
        for i in range(args.idle_tunnels):
            s = connect(ports[i % len(ports)])
            s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % echo)
            held.append(s)
        opened = 0
        for s in held:
            s.settimeout(30)
            try:
                opened += recv_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
            except OSError:
                pass
        probe_ok = sum(http_get(random.choice(ports)) for _ in range(50))
        held_fds = fds(proxymap.pid)
        for s in held:
            s.close()

        logged = (work / "proxymap.log").read_text(errors="replace")
        logged_failures = logged.count("Traceback") + logged.count("Unhandled")
        report = {
            "seed": rng_seed,
            "rounds": args.rounds,
            "ports": args.ports,
            "soak_seconds": round(soak_seconds, 1),
            "request_failures": failures,
            "fds_baseline": base_fds,
            "fds_after": end_fds,
            "rss_baseline_mib": round(base_rss / 2**20, 1),
            "rss_after_mib": round(end_rss / 2**20, 1),
            "idle_tunnels_opened": opened,
            "fds_with_tunnels": held_fds,
            "probe_requests_ok": f"{probe_ok}/50",
            "logged_failures": logged_failures,
        }
        print(json.dumps(report, indent=1))
        ok = (
            failures == 0
            and logged_failures == 0
            and probe_ok == 50
            and end_fds <= base_fds + 2
            and end_rss <= base_rss * 1.25 + 8 * 2**20
            and opened == args.idle_tunnels
        )
        print("SOAK OK" if ok else "SOAK FAILED")
        return 0 if ok else 1
    finally:
        stop_all(procs)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
