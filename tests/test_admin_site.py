"""
The admin API's HTTP server bounds (proxymap/admin/site.py), in memory: a
``StringTransport`` per connection and a ``Clock`` for the idle timeout.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.web.resource import Resource
from twisted.web.server import Request

from proxymap.admin import site
from proxymap.admin.api import AdminAPI
from proxymap.admin.site import AdminSite
from proxymap.config import Secret
from proxymap.sessions import SessionRegistry


class Recorder(Resource):
    """
    An application that answers every request with the size of its body.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[int] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        size = len(request.content.read())
        self.bodies.append(size)
        return b'{"size": %d}' % size


def connect(factory: AdminSite) -> tuple[Any, StringTransport]:
    addr = IPv4Address("TCP", "127.0.0.1", 50000)
    protocol = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    protocol.makeConnection(transport)
    return protocol, transport


def answer(transport: StringTransport) -> tuple[bytes, dict[str, str]]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    return status, json.loads(body)


@pytest.fixture
def app() -> Recorder:
    return Recorder()


@pytest.fixture
def factory(app: Recorder) -> AdminSite:
    return AdminSite(app, Clock())


def test_content_length_over_the_bound_is_refused_before_the_body(
    app: Recorder, factory: AdminSite
) -> None:
    protocol, transport = connect(factory)
    protocol.dataReceived(
        b"PUT /sessions/release HTTP/1.1\r\nHost: a\r\n"
        b"Content-Length: %d\r\n\r\n" % (site.MAX_BODY + 1)
    )
    status, body = answer(transport)
    assert status == b"HTTP/1.1 413 Content Too Large"
    assert body["error"] == "content too large"
    assert b"Connection: close\r\n" in transport.value()
    assert transport.disconnecting
    # What follows is not read into a body, and the application never runs.
    protocol.dataReceived(b"x" * 65536)
    assert app.bodies == []


def test_expect_continue_over_the_bound_gets_no_100(factory: AdminSite) -> None:
    protocol, transport = connect(factory)
    protocol.dataReceived(
        b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % (site.MAX_BODY + 1)
    )
    assert b"100 Continue" not in transport.value()
    assert answer(transport)[0] == b"HTTP/1.1 413 Content Too Large"


def test_a_body_at_the_bound_reaches_the_application(
    app: Recorder, factory: AdminSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(site, "MAX_BODY", 1000)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n")
    protocol.dataReceived(b"x" * 1000)
    assert app.bodies == [1000]
    assert transport.value().startswith(b"HTTP/1.1 200 OK")
    assert not transport.disconnecting


def put_chunked(factory: AdminSite, *sizes: int) -> StringTransport:
    """
    A chunked PUT of chunks of ``sizes`` bytes, the whole request in one read.
    """
    protocol, transport = connect(factory)
    chunks = b"".join(b"%x\r\n%s\r\n" % (n, b"x" * n) for n in sizes) + b"0\r\n\r\n"
    protocol.dataReceived(
        b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    )
    return transport


def test_a_chunked_body_over_the_bound_is_refused_even_when_complete(
    app: Recorder, factory: AdminSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(site, "MAX_BODY", 1000)
    # The overflowing chunk and the body's end come in the same read.
    transport = put_chunked(factory, 600, 600)
    assert app.bodies == []
    assert answer(transport)[0] == b"HTTP/1.1 413 Content Too Large"
    assert transport.value().count(b"HTTP/1.1") == 1
    assert transport.disconnecting


def test_a_chunked_body_within_the_bound_is_read(
    app: Recorder, factory: AdminSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(site, "MAX_BODY", 1000)
    transport = put_chunked(factory, 500, 500)
    assert app.bodies == [1000]
    assert transport.value().startswith(b"HTTP/1.1 200 OK")


def test_an_earlier_pipelined_request_is_answered_before_the_413(
    app: Recorder, factory: AdminSite
) -> None:
    protocol, transport = connect(factory)
    protocol.dataReceived(
        b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n"
        b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (site.MAX_BODY + 1)
    )
    value = transport.value()
    assert app.bodies == [0]
    assert value.startswith(b"HTTP/1.1 200 OK")
    assert value.index(b'{"size": 0}') < value.index(b"HTTP/1.1 413")


def test_connections_beyond_the_bound_are_answered_503_until_one_closes(
    app: Recorder, factory: AdminSite
) -> None:
    held = [connect(factory) for _ in range(site.MAX_CLIENTS)]
    _, busy = connect(factory)
    status, body = answer(busy)
    assert status == b"HTTP/1.1 503 Service Unavailable"
    assert body["error"] == "busy"
    assert b"Retry-After: 1\r\n" in busy.value()
    assert busy.disconnecting
    # A refused connection does not count; a closed one frees its place.
    held[0][0].connectionLost(None)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 OK")


def test_an_idle_connection_is_closed_after_the_timeout(app: Recorder) -> None:
    clock = Clock()
    factory = AdminSite(app, clock)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    clock.advance(site.IDLE_TIMEOUT - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting or transport.disconnected  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "head",
    [
        b"GET /sessions/%ff HTTP/1.1\r\nHost: a\r\n",
        b"PUT /sessions/release/%c3%28 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n",
        b"GET /sessions HTTP/1.1\r\nHost: \xff\r\n",
    ],
)
def test_a_path_or_host_not_utf8_is_a_json_400_without_a_traceback(head: bytes) -> None:
    """
    Klein answers these in text and logs a traceback for each; the API
    answers them as it answers other bad requests, before any user is
    asked for (nothing is looked up), and the connection goes on.
    """
    api = AdminAPI(SessionRegistry(clock=Clock()), {}, (("admin", Secret("pw")),))
    protocol, transport = connect(AdminSite(api.app.resource(), Clock()))
    with capturedLogs() as events:
        protocol.dataReceived(head + b"\r\n")
    status, body = answer(transport)
    assert status == b"HTTP/1.1 400 Bad Request"
    assert body == {
        "error": "bad request",
        "description": "the path and the host name must be UTF-8",
    }
    assert [e for e in events if "log_failure" in e or e["log_level"] != LogLevel.info] == []
    assert not transport.disconnecting
    transport.clear()
    protocol.dataReceived(b"GET /openapi.json HTTP/1.1\r\nHost: a\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 401 ")
