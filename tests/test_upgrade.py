"""
A protocol switch (HTTP/1.1 Upgrade, RFC 9110 7.8) through a mapped port,
in memory: a plain WebSocket asked for in absolute form, as aiohttp asks a
proxy for one.  The vendor's 101 turns both legs into one tunnel.
"""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from .helpers import Harness, creds, head_of, header

WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = (
    b"GET ws://example.com/chat HTTP/1.1\r\nHost: example.com\r\n"
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + WS_KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
#: The same asked for as RFC 9110 would have it, of an http:// target.
UPGRADE_HTTP = UPGRADE.replace(b"ws://", b"http://")


def test_upgrade_goes_upstream_as_http_with_its_fields() -> None:
    """
    A ``ws://`` target goes to the vendor as ``http://``, with Upgrade and
    ``Connection: Upgrade``, the session's credentials, and the end-to-end
    WebSocket fields as they came.
    """
    h = Harness()
    proto, _client = h.client()
    proto.dataReceived(UPGRADE)
    _up, upstream = h.upstream()
    first, lines, rest = head_of(upstream.value())
    assert first == b"GET http://example.com/chat HTTP/1.1"
    assert header(lines, b"upgrade") == [b"websocket"]
    assert header(lines, b"connection") == [b"Upgrade"]
    assert header(lines, b"sec-websocket-key") == [WS_KEY]
    assert header(lines, b"proxy-authorization") == [creds("sess0001")]
    assert rest == b""


def test_the_vendors_101_splices_both_legs() -> None:
    """
    The 101 reaches the client with its Upgrade and Connection fields, and
    from then on bytes go both ways untouched, those that came with the 101
    and those the client sent early included, counted to the session.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(UPGRADE_HTTP + b"EARLY")
    up, upstream = h.upstream()
    up.dataReceived(SWITCHED + b"\x81\x02hi")
    first, lines, rest = head_of(client.value())
    assert first == b"HTTP/1.1 101 Switching Protocols"
    assert header(lines, b"upgrade") == [b"websocket"]
    assert header(lines, b"connection") == [b"Upgrade"]
    assert header(lines, b"sec-websocket-accept") == [b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="]
    assert rest == b"\x81\x02hi"
    assert upstream.value().endswith(b"\r\n\r\nEARLY")
    assert proto.state == "tunnel"

    proto.dataReceived(b"\x81\x85masked")
    assert upstream.value().endswith(b"EARLY\x81\x85masked")
    up.dataReceived(b"GET / HTTP/1.1\r\n\r\n")  # not a response any more: just bytes
    assert client.value().endswith(b"\x81\x02hiGET / HTTP/1.1\r\n\r\n")
    # All the client got came from upstream, the 101's head as well.
    session = proto.session
    assert session is not None
    assert session.bytes_down == proto.bytes_down == len(client.value())


def test_an_upgraded_connection_is_never_kept() -> None:
    """
    When the client leaves, the upgraded upstream connection closes with it
    instead of waiting in the pool for the session's next client.
    """
    h = Harness(pool=True)
    proto, _client = h.client()
    proto.dataReceived(UPGRADE_HTTP)
    up, upstream = h.upstream()
    up.dataReceived(SWITCHED)
    assert proto.state == "tunnel"
    proto.connectionLost(Failure(ConnectionDone()))
    assert upstream.disconnecting
    assert h.tally.pool is not None and len(h.tally.pool) == 0


def test_a_new_session_closes_upgraded_connections_as_tunnels() -> None:
    """
    Like a CONNECT tunnel, an upgraded connection cannot change session: a
    worker's /session/new closes it, and one still awaiting its 101.
    """
    h = Harness(session_api={"enabled": True, "domain": "portmapper"})
    upgraded, upgraded_client = h.client()
    upgraded.dataReceived(UPGRADE)
    up, upstream = h.upstream()
    up.dataReceived(SWITCHED)
    waiting, waiting_client = h.client()
    waiting.dataReceived(UPGRADE)
    _, waiting_upstream = h.upstream()
    assert (upgraded.state, waiting.state) == ("tunnel", "connecting")

    worker, worker_client = h.client()
    worker.dataReceived(b"GET http://portmapper/session/new HTTP/1.1\r\nHost: portmapper\r\n\r\n")
    assert head_of(worker_client.value())[0] == b"HTTP/1.1 200 OK"
    assert upgraded_client.disconnecting and upstream.disconnecting
    assert waiting_client.disconnecting and waiting_upstream.disconnecting
    assert not worker_client.disconnecting


def test_a_refused_upgrade_is_an_ordinary_response() -> None:
    """
    A vendor or origin that will not switch answers as usual, and the
    client connection carries on with HTTP over the same upstream connection.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(UPGRADE)
    up, upstream = h.upstream()
    up.dataReceived(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
    assert head_of(client.value())[0] == b"HTTP/1.1 426 Upgrade Required"
    assert proto.state == "idle"
    proto.dataReceived(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert len(h.reactor.tcpClients) == 1
    assert upstream.value().split(b"\r\n\r\n")[1].startswith(b"GET http://example.com/ HTTP/1.1")
    up.dataReceived(OK)
    assert client.value().endswith(b"hello")


@pytest.mark.parametrize(
    ("request_head", "answer", "message"),
    [
        # No upgrade asked for; or one without Connection: upgrade, not forwarded.
        (
            b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
            SWITCHED,
            b"switched protocols unasked",
        ),
        (
            b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\r\n",
            SWITCHED,
            b"switched protocols unasked",
        ),
        # Asked for, but the 101 does not say what it switched to.
        (
            UPGRADE,
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n",
            b"switched protocols without naming one",
        ),
    ],
)
def test_a_101_the_client_cannot_follow_is_a_502(
    request_head: bytes, answer: bytes, message: bytes
) -> None:
    """
    A 101 is passed on only as the answer to the upgrade the client asked
    for; otherwise it is the vendor's error, and nothing after it reaches
    the client.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request_head)
    up, upstream = h.upstream()
    asked = header(head_of(upstream.value())[1], b"upgrade")
    assert asked == ([b"websocket"] if request_head is UPGRADE else [])
    up.dataReceived(answer + b"\x81\x02hi")
    first, _, body = head_of(client.value())
    assert first == b"HTTP/1.1 502 Bad Gateway"
    assert message in body
    assert b"\x81\x02hi" not in client.value()
    assert upstream.disconnecting


def test_wss_is_told_to_connect() -> None:
    """
    ``wss://`` needs TLS to the origin, which is the client's to make.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"GET wss://example.com/chat HTTP/1.1\r\nHost: example.com\r\n\r\n")
    first, _, body = head_of(client.value())
    assert first == b"HTTP/1.1 400 Bad Request"
    assert b"cannot forward wss:// requests; use CONNECT" in body
    assert h.reactor.tcpClients == []
