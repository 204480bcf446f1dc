"""
Real SOCKS clients through a mapped port, to a local origin via the sandbox
vendor: curl (SOCKS5 with remote names, SOCKS4a, SOCKS4) and PySocks.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from .conftest import Origin, Stack, curl, start_stack

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("flag", ["--socks5-hostname", "--socks4a", "--socks4"])
@pytest_twisted.ensureDeferred
async def test_curl_over_socks(stack: Stack, origin: Origin, flag: str) -> None:
    port = stack.ports[0]
    host = "127.0.0.1" if flag == "--socks4" else "localhost"
    code, out, err = await curl(flag, f"127.0.0.1:{port}", f"http://{host}:{origin.port}/s")
    assert code == 0, err
    assert json.loads(out)["path"] == "/s"
    session = stack.registry.peek(port)
    # The vendor saw a CONNECT with the port's session, the name unresolved.
    assert list(stack.vendor.seen) == [
        (f"alice-session-{session.id}", "CONNECT", f"{host}:{origin.port}")
    ]


@pytest_twisted.ensureDeferred
async def test_https_over_socks5(stack: Stack, origin: Origin) -> None:
    code, out, err = await curl(
        "--socks5-hostname",
        f"127.0.0.1:{stack.ports[1]}",
        "--cacert",
        str(origin.cafile),
        f"https://localhost:{origin.tls_port}/tls",
    )
    assert code == 0, err
    assert json.loads(out)["path"] == "/tls"


@pytest_twisted.ensureDeferred
async def test_socks_and_http_share_the_port_session(stack: Stack, origin: Origin) -> None:
    """
    One port, either protocol: the vendor sees the same session username.
    """
    port = stack.ports[2]
    code, _, err = await curl(
        "--socks5-hostname", f"127.0.0.1:{port}", f"http://localhost:{origin.port}/"
    )
    assert code == 0, err
    code, out, err = await curl("-x", f"http://127.0.0.1:{port}", "http://ip.sandbox/")
    assert code == 0, err
    usernames = {username for username, _, _ in stack.vendor.seen}
    assert usernames == {json.loads(out)["username"]}
    assert len(stack.vendor.seen) == 2


@pytest_twisted.ensureDeferred
async def test_socks5_into_the_session_api() -> None:
    stack = start_stack(1, session_api={"enabled": True, "domain": "portmapper"})
    try:
        port = stack.ports[0]
        code, out, err = await curl(
            "--socks5-hostname", f"127.0.0.1:{port}", "http://portmapper/session/new"
        )
        assert code == 0, err
        assert json.loads(out)["session_id"] == stack.registry.peek(port).id
        assert not stack.vendor.seen
    finally:
        await stack.service.stopService()


@pytest_twisted.ensureDeferred
async def test_pysocks_client(stack: Stack, origin: Origin) -> None:
    import socks  # PySocks

    def fetch() -> bytes:
        s = socks.socksocket()
        s.set_proxy(socks.SOCKS5, "127.0.0.1", stack.ports[0], rdns=True)
        s.settimeout(10)
        try:
            s.connect(("localhost", origin.port))
            s.sendall(b"GET /pysocks HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            s.close()

    answer = await deferToThread(fetch)
    assert answer.startswith(b"HTTP/1.1 200")
    assert b'"path": "/pysocks"' in answer


@pytest.mark.parametrize("resolve", ["remote", "local"])
@pytest_twisted.ensureDeferred
async def test_socks5_upstream(origin: Origin, resolve: str) -> None:
    """
    The sandbox vendor as a SOCKS5 upstream: it sees each session's username
    through RFC 1929, and the target by name unless resolved locally.
    """
    stack = start_stack(1, scheme="socks5", socks_resolve=resolve)
    try:
        port = stack.ports[0]
        proxy = f"127.0.0.1:{port}"
        code, out, err = await curl("-x", f"http://{proxy}", f"http://localhost:{origin.port}/a")
        assert code == 0, err
        assert json.loads(out)["path"] == "/a"
        code, out, err = await curl(
            "-x",
            f"http://{proxy}",
            "--cacert",
            str(origin.cafile),
            f"https://localhost:{origin.tls_port}/b",
        )
        assert code == 0, err
        code, out, err = await curl("--socks5-hostname", proxy, f"http://localhost:{origin.port}/c")
        assert code == 0, err
        session = stack.registry.peek(port)
        host = "localhost" if resolve == "remote" else "127.0.0.1"
        assert list(stack.vendor.seen) == [
            (f"alice-session-{session.id}", "CONNECT", f"{host}:{origin.port}"),
            (f"alice-session-{session.id}", "CONNECT", f"{host}:{origin.tls_port}"),
            (f"alice-session-{session.id}", "CONNECT", f"{host}:{origin.port}"),
        ]
    finally:
        await stack.service.stopService()


@pytest_twisted.ensureDeferred
async def test_socks5_upstream_rejecting_credentials() -> None:
    stack = start_stack(1, scheme="socks5", **{"pass": "wrong"})
    try:
        _code, out, _ = await curl(
            "-i", "-x", f"http://127.0.0.1:{stack.ports[0]}", "http://localhost:9/"
        )
        assert out.startswith(b"HTTP/1.1 502") and b"rejected" in out
    finally:
        await stack.service.stopService()
