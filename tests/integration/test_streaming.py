"""
Large bodies stream through a real proxymap process in bounded memory.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater

from .conftest import Origin, curl, free_ports, stop_process

pytestmark = pytest.mark.integration

SIZE = 512 * 1024 * 1024
#: Peak RSS may grow by this much over the idle baseline: a few socket
#: buffers' worth, two orders of magnitude below the body size.
ALLOWED_GROWTH = 48 * 1024 * 1024


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.fixture
def demo_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    sandbox, port, admin, release = free_ports(4)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twisted",
            "proxymap",
            "--demo",
            "--demo-ports",
            str(port),
            "--demo-sandbox-port",
            str(sandbox),
            "--demo-admin-port",
            str(admin),
            "--demo-release-port",
            str(release),
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc, port
    finally:
        stop_process(proc)


async def _wait_listening(port: int) -> None:
    for _ in range(200):  # at most ~10 s
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        await deferLater(reactor, 0.05)
    pytest.fail(f"proxymap did not listen on {port}")


async def _uploads_whole(proxy: str, upload: Path, url: str) -> None:
    """
    curl uploads ``upload`` through ``proxy`` and the origin counts every byte.
    """
    code, out, err = await curl("-x", proxy, "-H", "Expect:", "-T", str(upload), url, timeout=120)
    assert code == 0, err
    assert json.loads(out) == {"received": SIZE}


class StallingReader(Protocol):
    """
    Downloads through the proxy but stops reading for a while after the
    first bytes, as a slow client does; counts what arrives.
    """

    def __init__(self, url: bytes, stall: float) -> None:
        self.url = url
        self.stall = stall
        self.received = 0
        self.stalled = False
        self.done: Deferred[int] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % self.url)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if not self.stalled:
            self.stalled = True
            self.transport.pauseProducing()
            reactor.callLater(self.stall, self.transport.resumeProducing)

    def connectionLost(self, reason: object) -> None:
        self.done.callback(self.received)


@pytest_twisted.ensureDeferred
async def test_large_download_and_upload_in_bounded_memory(
    demo_process: tuple[subprocess.Popen[bytes], int], origin: Origin, tmp_path: Path
) -> None:
    proc, port = demo_process
    await _wait_listening(port)
    proxy = f"http://127.0.0.1:{port}"
    code, out, err = await curl("-x", proxy, "http://ip.sandbox/json")
    assert code == 0, err
    baseline = _status(proc.pid, "VmRSS")

    code, out, err = await curl(
        "-x",
        proxy,
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        f"http://127.0.0.1:{origin.port}/bytes/{SIZE}",
        timeout=120,
    )
    assert code == 0, err
    assert int(out) == SIZE

    upload = tmp_path / "upload.bin"
    with upload.open("wb") as f:
        f.truncate(SIZE)  # sparse: costs no disk
    await _uploads_whole(proxy, upload, f"http://127.0.0.1:{origin.port}/count")

    # The same with a stalled reader on each side: without backpressure the
    # proxy would have to hold what the fast side keeps sending.
    reader = StallingReader(b"http://127.0.0.1:%d/bytes/%d" % (origin.port, SIZE), 1.5)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), reader)
    assert await reader.done > SIZE
    await _uploads_whole(proxy, upload, f"http://127.0.0.1:{origin.port}/count?pause=1.5")

    peak = _status(proc.pid, "VmHWM")
    assert peak - baseline < ALLOWED_GROWTH, (baseline, peak)
    assert proc.poll() is None
