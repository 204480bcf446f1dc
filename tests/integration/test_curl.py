"""
Real curl through real mapped ports, over loopback, to the sandbox vendor
and a local origin.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from zope.interface import implementer

from .conftest import Origin, Stack, curl

pytestmark = pytest.mark.integration


async def exit_of(port: int) -> dict[str, object]:
    code, out, err = await curl("-x", f"http://127.0.0.1:{port}", "http://ip.sandbox/json")
    assert code == 0, err
    return json.loads(out)


@pytest_twisted.ensureDeferred
async def test_plain_http_to_origin(stack: Stack, origin: Origin) -> None:
    """
    curl through a port reaches the origin through the vendor; the origin
    never sees proxy credentials; the vendor saw the port's session username.
    """
    port = stack.ports[0]
    code, out, err = await curl(
        "-x",
        f"http://127.0.0.1:{port}",
        "-U",
        "client:pw",
        f"http://127.0.0.1:{origin.port}/hello?x=1",
    )
    assert code == 0, err
    echo = json.loads(out)
    assert echo["path"] == "/hello?x=1"
    assert echo["proxy_authorization"] is False
    session = stack.registry.peek(port)
    assert stack.vendor.usernames == {f"alice-session-{session.id}": 1}


@pytest_twisted.ensureDeferred
async def test_the_origin_gets_the_targets_host(stack: Stack, origin: Origin) -> None:
    """
    curl sent a Host of its own (``-H``) beside an absolute URL: the origin
    gets the URL's host, as a proxy must send it (RFC 9112 3.2.2).
    """
    code, out, err = await curl(
        "-x",
        f"http://127.0.0.1:{stack.ports[0]}",
        "-H",
        "Host: other.example",
        f"http://127.0.0.1:{origin.port}/hello",
    )
    assert code == 0, err
    hosts = [h for h in json.loads(out)["headers"] if h.lower().startswith("host:")]
    assert hosts == [f"Host: 127.0.0.1:{origin.port}"]


@pytest_twisted.ensureDeferred
async def test_https_through_connect_to_tls_origin(stack: Stack, origin: Origin) -> None:
    """
    HTTPS via CONNECT: the tunnel carries a real TLS handshake, verified by
    curl against the origin's self-signed certificate.
    """
    port = stack.ports[1]
    code, out, err = await curl(
        "-x",
        f"http://127.0.0.1:{port}",
        "--cacert",
        str(origin.cafile),
        f"https://localhost:{origin.tls_port}/secure",
    )
    assert code == 0, err
    assert json.loads(out)["path"] == "/secure"
    session = stack.registry.peek(port)
    ((username, method, target),) = list(stack.vendor.seen)
    assert (username, method, target) == (
        f"alice-session-{session.id}",
        "CONNECT",
        f"localhost:{origin.tls_port}",
    )


@pytest_twisted.ensureDeferred
async def test_tunnels_to_the_sandbox_exit_page(stack: Stack, tmp_path: Path) -> None:
    """
    ip.sandbox answers in a tunnel too, as the session that opened it:
    through a CONNECT or a SOCKS5 CONNECT, in plain HTTP or in HTTPS that
    curl verifies against the sandbox's own certificate.  A client that
    verifies against the system's authorities fails at once, never hangs.
    """
    port = stack.ports[0]
    cafile = tmp_path / "sandbox.pem"
    cafile.write_bytes(stack.vendor.certificates.pem("ip.sandbox"))
    http, socks = ["-x", f"http://127.0.0.1:{port}"], ["--socks5-hostname", f"127.0.0.1:{port}"]
    ways = [
        [*http, "http://ip.sandbox/json"],
        ["-p", *http, "http://ip.sandbox/json"],
        [*http, "--cacert", str(cafile), "https://ip.sandbox/json"],
        [*socks, "http://ip.sandbox/json"],
        [*socks, "--cacert", str(cafile), "https://IP.sandbox/json"],
    ]
    seen = []
    for way in ways:
        code, out, err = await curl(*way)
        assert code == 0, (way, err)
        seen.append(json.loads(out))
    username = f"alice-session-{stack.registry.peek(port).id}"
    assert {s["username"] for s in seen} == {username}
    assert len({s["ip"] for s in seen}) == 1
    assert [s["requests"] for s in seen] == [1, 3, 5, 7, 9]  # a tunnel's CONNECT counts too
    assert [method for _, method, _ in stack.vendor.seen].count("CONNECT") == 4
    code, _, err = await curl(*http, "https://ip.sandbox/json", timeout=10)
    assert code == 60, err  # the certificate is not one the system trusts


@pytest_twisted.ensureDeferred
async def test_tls_to_the_port_fails_at_once(stack: Stack) -> None:
    """
    curl -x https://...: the port speaks plain HTTP and SOCKS, so curl's TLS
    handshake is refused at once (not after the 30 s head timeout) and the
    port goes on serving.
    """
    port = stack.ports[0]
    proxy = f"https://127.0.0.1:{port}"
    code, _, err = await curl("-x", proxy, "http://ip.sandbox/json", timeout=10)
    assert code == 35, err  # curl's "SSL connect error", not 28, its own timeout
    assert (await exit_of(port))["username"].startswith("alice-session-")


@pytest_twisted.ensureDeferred
async def test_stickiness_per_port_until_lifetime_ends(stack: Stack) -> None:
    """
    The same port keeps its exit; another port has another; when the
    lifetime ends the port gets a new session and a new exit.
    """
    a1 = await exit_of(stack.ports[0])
    a2 = await exit_of(stack.ports[0])
    b1 = await exit_of(stack.ports[1])
    assert a1["ip"] == a2["ip"] and a1["session"] == a2["session"]
    assert b1["ip"] != a1["ip"] and b1["session"] != a1["session"]

    stack.clock.advance(599)
    assert (await exit_of(stack.ports[0]))["session"] == a1["session"]
    stack.clock.advance(1)
    a3 = await exit_of(stack.ports[0])
    assert a3["session"] != a1["session"] and a3["ip"] != a1["ip"]


@pytest_twisted.ensureDeferred
async def test_keep_alive_requests_follow_rotation(stack: Stack) -> None:
    """
    A session renewed after one request shows in the next curl invocation,
    whose two requests share one client connection and that session.  curl
    says how many connections each transfer opened (``%{num_connects}``: 0
    for a reused one), not its ``-v`` wording, which changes between
    releases.
    """
    port = stack.ports[2]
    url = "http://ip.sandbox/json"
    first = await exit_of(port)
    stack.registry.renew(port)
    code, out, err = await curl(
        "-x", f"http://127.0.0.1:{port}", url, url, "-w", "%{num_connects}\n"
    )
    assert code == 0, err
    lines = out.splitlines()
    bodies = [json.loads(line) for line in lines[0::2]]
    assert lines[1::2] == [b"1", b"0"]
    assert bodies[0]["session"] == bodies[1]["session"] != first["session"]


@pytest_twisted.ensureDeferred
async def test_errors_are_http_answers_and_port_keeps_serving(stack: Stack) -> None:
    port = stack.ports[0]
    _code, out, _err = await curl("-i", f"http://127.0.0.1:{port}/")
    assert out.startswith(b"HTTP/1.1 400")
    # Upstream refusing the target: the sandbox cannot connect to a closed port.
    _code, out, _err = await curl("-i", "-x", f"http://127.0.0.1:{port}", "http://127.0.0.1:9/")
    assert out.startswith(b"HTTP/1.1 502")
    assert (await exit_of(port))["ip"]


@pytest_twisted.ensureDeferred
async def test_vendor_rejecting_credentials_is_502() -> None:
    from .conftest import start_stack

    s = start_stack(1, **{"pass": "wrong"})
    try:
        _code, out, _err = await curl(
            "-i", "-x", f"http://127.0.0.1:{s.ports[0]}", "http://ip.sandbox/json"
        )
        assert out.startswith(b"HTTP/1.1 502")
        assert b"rejected" in out and b"wrong" not in out
    finally:
        await s.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_gateway_known_by_name(origin: Origin) -> None:
    """
    The vendor's gateway given as a name (``localhost``, through the
    reactor's own resolver): requests and tunnels go through, and the name
    is looked up once for all of them.
    """
    from .conftest import start_stack

    s = start_stack(1, gateway="localhost")
    try:
        proxy = f"http://127.0.0.1:{s.ports[0]}"
        for path in ("/a", "/b"):
            code, out, err = await curl("-x", proxy, f"http://127.0.0.1:{origin.port}{path}")
            assert code == 0, err
            assert json.loads(out)["path"] == path
        code, out, err = await curl(
            "-x",
            proxy,
            "--cacert",
            str(origin.cafile),
            f"https://localhost:{origin.tls_port}/c",
        )
        assert code == 0, err
        assert json.loads(out)["path"] == "/c"
        names = s.service.tally.names
        assert names is not None and names.lookups == 1
        assert names.address("localhost") == "127.0.0.1"
    finally:
        await s.service.stopService()


@implementer(IHalfCloseableProtocol)
class _HalfCloser(Protocol):
    """
    Opens a tunnel, sends a payload, shuts its write side, reads to EOF.
    """

    def __init__(self, target: bytes, payload: bytes) -> None:
        self.target = target
        self.payload = payload
        self.data = b""
        self.done: Deferred[bytes] = Deferred()
        self.established = False

    def connectionMade(self) -> None:
        self.transport.write(
            b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (self.target, self.target)
        )

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.established and b"\r\n\r\n" in self.data:
            head, self.data = self.data.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200"), head
            self.established = True
            self.transport.write(self.payload)
            self.transport.loseWriteConnection()

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object) -> None:
        if not self.done.called:
            self.done.callback(self.data)


@pytest_twisted.ensureDeferred
async def test_tunnel_half_close_on_real_sockets(stack: Stack, origin: Origin) -> None:
    """
    The client shuts its write side; the origin sees EOF, still answers, and
    closes; the client gets the answer, then EOF; nothing stays open.
    """
    client = _HalfCloser(b"127.0.0.1:%d" % origin.port, b"HALFCLOSE" + b"x" * 100000)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", stack.ports[0])
    await connectProtocol(endpoint, client)
    data = await client.done
    assert data == b"got %d bytes" % (100009)
    factories = [listener.factory for listener in stack.service.listeners()]
    for _ in range(50):  # bounded wait for the server side to finish closing
        if not any(factory.connections for factory in factories):
            break
        await deferLater(reactor, 0.02)
    assert all(not factory.connections for factory in factories)
