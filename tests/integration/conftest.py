"""
Fixtures for integration tests: real sockets on 127.0.0.1, real curl.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor, ssl, task
from twisted.internet.utils import getProcessOutputAndValue

from proxymap.config import parse_config
from proxymap.dataplane.server import ProxyFactory
from proxymap.sandbox.vendor import SandboxVendor
from proxymap.tap import ProxymapService, build_service

from .origin import OriginFactory, self_signed_certificate

pytestmark = pytest.mark.integration


_handed_out: set[int] = set()


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> int:
    """
    Stop a process a test started: ``sig``, 15 s to exit, then SIGKILL.
    Return its exit status.
    """
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=10)


def free_ports(n: int) -> list[int]:
    """
    ``n`` distinct ports that were free a moment ago on 127.0.0.1, never one
    this test run handed out before (two calls in one test must not collide).
    """
    sockets = []
    ports: list[int] = []
    try:
        for _ in range(n + 64):  # bounded: skip ports handed out already
            if len(ports) == n:
                break
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            port = s.getsockname()[1]
            if port not in _handed_out:
                ports.append(port)
                _handed_out.add(port)
        if len(ports) < n:
            pytest.fail("could not find free ports")
        return ports
    finally:
        for s in sockets:
            s.close()


async def curl(*args: str, timeout: float = 60) -> tuple[int, bytes, bytes]:
    """
    Run curl without blocking the reactor; returns (exit code, stdout, stderr).
    """
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed (.ci/run installs it)")
    out, err, code = await getProcessOutputAndValue(
        "curl", ("-sS", "--max-time", str(timeout), "--noproxy", "", *args), env=dict(os.environ)
    )
    return code, out, err


@attrs.define
class Origin:
    port: int
    tls_port: int
    cafile: Path


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    cert, key = self_signed_certificate()
    cafile = tmp_path / "origin.pem"
    cafile.write_bytes(cert)
    keyfile = tmp_path / "origin.key"
    keyfile.write_bytes(key)
    options = ssl.DefaultOpenSSLContextFactory(str(keyfile), str(cafile))
    plain = reactor.listenTCP(0, OriginFactory(), interface="127.0.0.1")
    tls = reactor.listenSSL(0, OriginFactory(), options, interface="127.0.0.1")
    yield Origin(plain.getHost().port, tls.getHost().port, cafile)
    pytest_twisted.blockon(plain.stopListening())
    pytest_twisted.blockon(tls.stopListening())


@attrs.define
class Stack:
    """
    proxymap (in this process) in front of the sandbox vendor.
    """

    service: ProxymapService
    vendor: SandboxVendor
    clock: task.Clock
    ports: list[int]
    sandbox_port: int

    @property
    def registry(self) -> Any:
        return self.service.registry


def start_stack(
    nports: int = 3,
    admin: dict[str, Any] | None = None,
    scheme: str = "http",
    gateway: str = "127.0.0.1",
    **mapping: Any,
) -> Stack:
    """
    proxymap on ``nports`` free ports in front of a sandbox vendor (reached
    as ``gateway``, an address or a name); the admin API only where
    ``admin`` says (never on the default port 8700).
    """
    sandbox_port, *ports = free_ports(nports + 1)
    raw = {
        "name": "sandbox",
        "ports": ports,
        "upstream": f"{scheme}://{gateway}:{sandbox_port}",
        "user": "alice",
        "pass": "s3cret",
        "lifetime": "10m",
    }
    raw.update(mapping)
    config = parse_config({"mapping": [raw], "admin": admin or {"listen": ""}}, env={})
    vendor = SandboxVendor(user="alice", password="s3cret")
    clock = task.Clock()
    service = build_service(config, reactor, clock=clock, sandbox=(vendor, sandbox_port))
    service.privilegedStartService()
    service.startService()
    return Stack(service, vendor, clock, ports, sandbox_port)


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = start_stack()
    yield s
    for listener in s.service.listeners():
        if isinstance(listener.factory, ProxyFactory):
            for conn in list(listener.factory.connections.values()):
                conn.abort()
    pytest_twisted.blockon(s.service.stopService())
