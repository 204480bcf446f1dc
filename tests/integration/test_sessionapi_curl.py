"""
The reference article's curl commands against a running proxymap and the
sandbox vendor: the exit seen through a port changes after /session/new and
after /session/reset plus a request, and not otherwise.
"""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from .conftest import curl, start_stack

pytestmark = pytest.mark.integration


async def call(*args: str) -> Any:
    code, out, err = await curl(*args)
    assert code == 0, err
    return json.loads(out)


async def check_rotation(port: int, api: list[str]) -> None:
    """
    ``api`` is the curl prefix reaching the Session API of ``port``.
    """
    proxy = ["-x", f"http://127.0.0.1:{port}"]
    exit1 = await call(*proxy, "http://ip.sandbox/json")
    shown = await call(*api[:-1], api[-1] + "/session/")
    assert shown["session_id"] == exit1["session"]
    assert set(shown) >= {"session_id", "expires_at", "expired"}
    assert shown["expires_at"].endswith(" GMT") and shown["expired"] is False
    again = await call(*api[:-1], api[-1] + "/session/")
    assert again["session_id"] == shown["session_id"]
    assert (await call(*proxy, "http://ip.sandbox/json"))["ip"] == exit1["ip"]

    renewed = await call(*api[:-1], api[-1] + "/session/new")
    assert renewed["session_id"] != exit1["session"]
    exit2 = await call(*proxy, "http://ip.sandbox/json")
    assert exit2["session"] == renewed["session_id"] and exit2["ip"] != exit1["ip"]

    assert (await call(*api[:-1], api[-1] + "/session/reset"))["success"] is True
    exit3 = await call(*proxy, "http://ip.sandbox/json")
    assert exit3["session"] not in (exit1["session"], exit2["session"])
    assert exit3["ip"] not in (exit1["ip"], exit2["ip"])
    assert (await call(*proxy, "http://ip.sandbox/json"))["ip"] == exit3["ip"]


@pytest_twisted.ensureDeferred
async def test_article_commands_with_domain() -> None:
    stack = start_stack(2, session_api={"enabled": True, "domain": "portmapper"})
    try:
        port = stack.ports[0]
        # curl -x http://127.0.0.1:10201 http://portmapper/session/ (and reset, new)
        await check_rotation(port, ["-x", f"http://127.0.0.1:{port}", "http://portmapper"])
        # The other port was never touched.
        assert stack.registry.peek(stack.ports[1]) is None
        # Only check_rotation's five ip.sandbox lookups reached the vendor.
        assert sum(stack.vendor.usernames.values()) == 5
    finally:
        await stack.service.stopService()


@pytest_twisted.ensureDeferred
async def test_article_commands_with_empty_domain() -> None:
    stack = start_stack(1, session_api={"enabled": True, "domain": ""})
    try:
        port = stack.ports[0]
        # curl http://127.0.0.1:10201/session/
        await check_rotation(port, [f"http://127.0.0.1:{port}"])
        # Whatever Host says (the reference product broke this once).
        shown = await call("-H", "Host: example.com", f"http://127.0.0.1:{port}/session/")
        assert shown["port"] == port
    finally:
        await stack.service.stopService()


@pytest_twisted.ensureDeferred
async def test_through_a_connect_tunnel() -> None:
    """
    curl --proxytunnel CONNECTs to portmapper:80 first and sends the request
    inside the tunnel; it is answered locally.
    """
    stack = start_stack(1, session_api={"enabled": True, "domain": "portmapper"})
    try:
        port = stack.ports[0]
        body = await call("-p", "-x", f"http://127.0.0.1:{port}", "http://portmapper/session/new")
        assert body["session_id"] == stack.registry.peek(port).id
        assert not stack.vendor.seen
    finally:
        await stack.service.stopService()


@pytest_twisted.ensureDeferred
async def test_https_through_a_connect_tunnel(tmp_path: Path) -> None:
    """
    curl -x ... https://portmapper/session/: the tunnel to the domain speaks
    TLS with a certificate for the domain, which curl verifies when given it
    (and -k skips); over SOCKS5 as well.  None of it reaches the vendor.
    """
    stack = start_stack(1, session_api={"enabled": True, "domain": "portmapper"})
    try:
        port = stack.ports[0]
        cafile = tmp_path / "portmapper.pem"
        cafile.write_bytes(stack.service.session_api.certificates.pem("portmapper"))
        proxy = ["-x", f"http://127.0.0.1:{port}", "--cacert", str(cafile)]
        await check_rotation(port, [*proxy, "https://portmapper"])
        socks = ["--socks5-hostname", f"127.0.0.1:{port}", "-k"]
        body = await call(*socks, "https://portmapper/session/new")
        assert body["session_id"] == stack.registry.peek(port).id
        assert {method for _, method, _ in stack.vendor.seen} == {"GET"}  # check_rotation's
    finally:
        await stack.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_keep_alive_https_client_follows_a_renewal() -> None:
    """
    A worker that keeps its HTTPS connection open (as requests.Session and
    browsers do) exits through the new session after /session/new: the old
    session's tunnel is closed, and the client's reconnect (which urllib3
    makes for a dropped keep-alive connection) gets the new session.
    """
    stack = start_stack(1, session_api={"enabled": True, "domain": "portmapper"})
    port = stack.ports[0]
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=unverified)
    conn.set_tunnel("ip.sandbox", 443)

    def fetch() -> tuple[int, Any]:
        """
        GET https://ip.sandbox/json on the kept connection; how many times
        it had to connect, and the answer.
        """
        for attempt in range(2):  # the kept connection, then one reconnect
            try:
                conn.request("GET", "/json")
                return attempt, json.loads(conn.getresponse().read())
            except (OSError, http.client.HTTPException):
                conn.close()
        raise AssertionError("no answer after a reconnect")

    try:
        _, first = await deferToThread(fetch)
        attempts, again = await deferToThread(fetch)
        assert attempts == 0 and again["session"] == first["session"]  # kept alive
        renewed = await call("-x", f"http://127.0.0.1:{port}", "http://portmapper/session/new")
        attempts, after = await deferToThread(fetch)
        assert attempts == 1  # the old tunnel was closed
        assert after["session"] == renewed["session_id"] != first["session"]
    finally:
        conn.close()
        await stack.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_bad_handshake_in_a_tunnel_closes_it(tmp_path: Path) -> None:
    """
    Bytes that open a TLS record but are no handshake end that connection
    at once; the port goes on serving.
    """
    stack = start_stack(1, session_api={"enabled": True, "domain": "portmapper"})
    try:
        port = stack.ports[0]
        done: Deferred[bytes] = Deferred()

        class Client(Protocol):
            received = b""

            def connectionMade(self) -> None:
                self.transport.write(  # type: ignore[union-attr]
                    b"CONNECT portmapper:443 HTTP/1.1\r\nHost: portmapper:443\r\n\r\n"
                    + b"\x16\x03\x01\x00\x10"
                    + b"not a handshake!"
                )

            def dataReceived(self, data: bytes) -> None:
                self.received += data

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                done.callback(self.received)

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        await connectProtocol(endpoint, Client())
        received = await done.addTimeout(10, reactor)
        assert received.startswith(b"HTTP/1.1 200 Connection established\r\n\r\n")
        body = await call("-x", f"http://127.0.0.1:{port}", "http://portmapper/session/")
        assert body["session_id"] == stack.registry.peek(port).id
    finally:
        await stack.service.stopService()


@pytest_twisted.ensureDeferred
async def test_disabled_api_requests_are_proxied() -> None:
    stack = start_stack(1)
    try:
        _code, out, _ = await curl(
            "-i", "-x", f"http://127.0.0.1:{stack.ports[0]}", "http://portmapper/session/"
        )
        # The sandbox vendor tried to reach the (non-existent) host portmapper.
        assert out.startswith(b"HTTP/1.1 502")
        assert [seen[2] for seen in stack.vendor.seen] == ["http://portmapper/session/"]
    finally:
        await stack.service.stopService()


@pytest_twisted.ensureDeferred
async def test_session_parameters_reach_the_vendor() -> None:
    stack = start_stack(
        1,
        session_api={"enabled": True, "domain": "portmapper"},
        session_params={"country": ""},
        username="{user}[-country-{country|lower}]-session-{session}",
    )
    try:
        port = stack.ports[0]
        proxy = ["-x", f"http://127.0.0.1:{port}"]
        assert (await call(*proxy, "http://ip.sandbox/json"))["params"] == {}
        renewed = await call(*proxy, "http://portmapper/session/new?country=DE")
        assert renewed["params"] == {"country": "DE"}
        seen = await call(*proxy, "http://ip.sandbox/json")
        assert seen["session"] == renewed["session_id"]
        assert seen["params"] == {"country": "de"}
        assert seen["username"] == f"alice-country-de-session-{renewed['session_id']}"
    finally:
        await stack.service.stopService()
