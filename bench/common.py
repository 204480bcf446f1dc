"""
What the bench scripts share: free loopback ports, waiting for listeners and
stopping every process a script started.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterable


def free_ports(n: int) -> list[int]:
    """
    ``n`` distinct ports free a moment ago on 127.0.0.1 (all held until chosen,
    so no two are the same).
    """
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_range(n: int) -> list[int]:
    """
    ``n`` consecutive ports, each free a moment ago (bounded search).  Below
    the ephemeral range (32768-), so outgoing connections never take them.
    Free as a server sees it: with ``SO_REUSEADDR``, as every subject
    listens, so that the connections an earlier load left in TIME_WAIT on a
    port do not make it look taken (after the 1000-port loads, no 5001
    consecutive ports looked free without it).
    """
    for _ in range(50):
        first = random.randrange(20000, 32768 - n)
        socks = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
            return list(range(first, first + n))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise SystemExit(f"no {n} consecutive free ports")


def listening(ports: Iterable[int]) -> set[int]:
    """
    Which of ``ports`` have a TCP listener on 127.0.0.1 (or 0.0.0.0), asked
    of the kernel with ``ss -ltn``: unlike connecting, looking makes the
    server do nothing, so it cannot change what is being measured.  (Not
    /proc/net/tcp: it lists every socket, and with the ~80,000 TIME_WAIT
    sockets a throughput phase leaves, one read took 150 ms of CPU, which
    showed up in start-up times.)
    """
    wanted = set(ports)
    out = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        fields = line.split()
        address, _, port = fields[3].rpartition(":")
        if address in ("127.0.0.1", "0.0.0.0"):
            found.add(int(port))
    return wanted & found


def wait_listening(ports: Iterable[int]) -> None:
    """
    Wait until every port of ``ports`` listens (at most ~30 s).  Start-up
    times are measured with this, so it looks every 10 ms.
    """
    wanted = set(ports)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if listening(wanted) == wanted:
            return
        time.sleep(0.01)
    missing = sorted(wanted - listening(wanted))
    raise SystemExit(f"nothing listens on {missing[:5]}")


def stop_all(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """
    SIGTERM every process, then kill what has not exited 10 s later.
    """
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
