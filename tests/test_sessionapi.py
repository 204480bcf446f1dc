"""
The in-band Session API, in memory: routing, JSON, and how it mixes with
proxied traffic on one connection.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import AccumulatingProtocol, StringTransport

from proxymap.sessionapi import http_date
from proxymap.sessions import EndReason

from .helpers import FUZZ_EXAMPLES, PORT, Harness, creds, head_of, header

ON = {"enabled": True, "domain": "portmapper"}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def api(h: Harness, request: bytes, port: int = PORT) -> tuple[bytes, list[bytes], Any]:
    """
    Send one request on a new connection; return status line, headers, JSON.
    """
    proto, client = h.client(port)
    proto.dataReceived(request)
    first, lines, body = head_of(client.value())
    return first, lines, json.loads(body) if body else None


def get(path: str, host: str = "portmapper", method: str = "GET") -> bytes:
    return f"{method} http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def test_show_creates_then_repeats() -> None:
    h = Harness(session_api=ON)
    h.reactor.advance(1_781_107_783)  # Wed, 10 Jun 2026 16:09:43 GMT minus the lifetime
    first, lines, body = api(h, get("/session/"))
    assert first == b"HTTP/1.1 200 OK"
    session = h.registry.peek(PORT)
    assert session is not None
    assert list(body)[:3] == ["session_id", "expires_at", "expired"]
    assert body["session_id"] == session.id
    assert body["expires_at"] == "Wed, 10 Jun 2026 16:19:43 GMT"
    assert body["expired"] is False
    assert body["port"] == PORT and body["lifetime"] == 600 and body["seconds_left"] == 600
    assert header(lines, b"x-session-id") == [session.id.encode()]
    assert header(lines, b"x-expires-at") == [b"Wed, 10 Jun 2026 16:19:43 GMT"]
    assert header(lines, b"content-type") == [b"application/json"]
    h.reactor.advance(100)
    _, _, again = api(h, get("/session"))
    assert again["session_id"] == session.id and again["seconds_left"] == 500


def test_reset_then_next_request_makes_a_new_session() -> None:
    h = Harness(session_api=ON)
    old = h.registry.current(PORT)
    first, _, body = api(h, get("/session/reset"))
    assert first == b"HTTP/1.1 200 OK"
    assert body == {"success": True, "ended_session_id": old.id}
    assert old.ended is EndReason.RESET
    assert h.registry.peek(PORT) is None
    _, _, again = api(h, get("/session/reset"))
    assert again == {"success": True, "ended_session_id": None}

    proto, _ = h.client()
    proto.dataReceived(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    _, upstream = h.upstream()
    new = h.registry.peek(PORT)
    assert new is not None and new.id != old.id
    assert header(head_of(upstream.value())[1], b"proxy-authorization") == [creds(new.id)]


def test_new_replaces_immediately() -> None:
    h = Harness(session_api=ON)
    old = h.registry.current(PORT)
    _, lines, body = api(h, get("/session/new"))
    new = h.registry.peek(PORT)
    assert new is not None and new.id != old.id
    assert old.ended is EndReason.RENEWED
    assert body["session_id"] == new.id
    assert header(lines, b"x-session-id") == [new.id.encode()]


@pytest.mark.parametrize("path", ["/session/reset", "/session/new"])
def test_post_is_accepted(path: str) -> None:
    h = Harness(session_api=ON)
    first, _, _ = api(h, get(path, method="POST"))
    assert first == b"HTTP/1.1 200 OK"


def test_post_with_body_keeps_connection_usable() -> None:
    h = Harness(session_api=ON)
    proto, client = h.client()
    proto.dataReceived(
        b"POST http://portmapper/session/new HTTP/1.1\r\nHost: portmapper\r\n"
        b"Content-Length: 5\r\n\r\nhello" + get("/session/")
    )
    assert client.value().count(b"HTTP/1.1 200 OK") == 2
    assert not client.disconnecting


def test_unknown_path_is_json_404() -> None:
    h = Harness(session_api=ON)
    first, _, body = api(h, get("/sessions"))
    assert first == b"HTTP/1.1 404 Not Found"
    assert body["error"] == "not found" and "/session/new" in body["description"]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("DELETE", "/session/", b"GET, HEAD"), ("PUT", "/session/new", b"GET, POST")],
)
def test_wrong_method_is_json_405_with_allow(method: str, path: str, allow: bytes) -> None:
    h = Harness(session_api=ON)
    first, lines, body = api(h, get(path, method=method))
    assert first == b"HTTP/1.1 405 Method Not Allowed"
    assert header(lines, b"allow") == [allow]
    assert body["error"] == "method not allowed"


def test_api_never_goes_upstream_nor_counts_as_traffic() -> None:
    h = Harness(session_api=ON)
    for path in ("/session/", "/session/new", "/session/", "/nope"):
        api(h, get(path))
    assert h.reactor.tcpClients == []
    session = h.registry.peek(PORT)
    assert session is not None and session.requests == 0 and session.bytes_down == 0


def test_domain_is_case_insensitive_and_any_port() -> None:
    h = Harness(session_api=ON)
    first, _, body = api(h, get("/session/", host="PortMapper:8080"))
    assert first == b"HTTP/1.1 200 OK" and body["port"] == PORT


@pytest.mark.parametrize("host", ["portmapper.", "PORTMAPPER.:80"])
def test_domain_fully_qualified_is_the_same_name(host: str) -> None:
    h = Harness(session_api=ON)
    first, _, body = api(h, get("/session/", host=host))
    assert first == b"HTTP/1.1 200 OK" and body["port"] == PORT


@pytest.mark.parametrize("host", ["portmapper..", "portmapperx", "x.portmapper"])
def test_other_names_are_proxied(host: str) -> None:
    h = Harness(session_api=ON)
    proto, _ = h.client()
    proto.dataReceived(get("/session/", host=host))
    assert [c[:2] for c in h.reactor.tcpClients] == [("192.0.2.10", 10000)]


def test_escaped_unreserved_characters_route_as_themselves() -> None:
    h = Harness(session_api=ON)
    first, _, body = api(h, get("/%73ession/%6eew"))
    assert first == b"HTTP/1.1 200 OK"
    renewed = body["session_id"]
    first, _, body = api(h, get("/%73%65%73%73%69%6F%6E/"))
    assert first == b"HTTP/1.1 200 OK" and body["session_id"] == renewed


@pytest.mark.parametrize("path", ["/session%2Fnew", "/session%2fnew", "/session/new%00", "/%"])
def test_escaped_reserved_characters_are_not_separators(path: str) -> None:
    h = Harness(session_api=ON)
    first, _, body = api(h, get(path))
    assert first == b"HTTP/1.1 404 Not Found" and body["error"] == "not found"
    assert h.registry.peek(PORT) is None


def test_acts_on_the_port_the_request_arrived_on() -> None:
    h = Harness(session_api=ON)
    a = h.registry.current(10201)
    b = h.registry.current(10202)
    _, _, body = api(h, get("/session/new"), port=10202)
    assert h.registry.peek(10201) is a
    assert b.ended is EndReason.RENEWED and body["session_id"] != b.id


def test_mixed_with_proxied_requests_in_order() -> None:
    """
    On one keep-alive connection: proxied, API, proxied.  The API answer waits
    its turn and the second proxied request uses the new session.
    """
    h = Harness(session_api=ON)
    proto, client = h.client()
    proto.dataReceived(
        b"GET http://example.com/1 HTTP/1.1\r\nHost: example.com\r\n\r\n"
        + get("/session/new")
        + b"GET http://example.com/2 HTTP/1.1\r\nHost: example.com\r\n\r\n"
    )
    first_session = h.registry.peek(PORT)
    assert first_session is not None
    up1, upstream1 = h.upstream()
    assert client.value() == b""
    up1.dataReceived(OK)
    out = client.value()
    assert out.index(b"\r\n\r\nok") < out.index(b'"session_id"')
    assert first_session.ended is EndReason.RENEWED
    up2, upstream2 = h.upstream()
    assert upstream1.disconnecting
    second = h.registry.peek(PORT)
    assert second is not None
    assert header(head_of(upstream2.value())[1], b"proxy-authorization") == [creds(second.id)]
    up2.dataReceived(OK)
    assert client.value().count(b"\r\n\r\nok") == 2


def test_disabled_means_proxied() -> None:
    h = Harness()
    proto, _ = h.client()
    proto.dataReceived(get("/session/new"))
    assert [c[:2] for c in h.reactor.tcpClients] == [("192.0.2.10", 10000)]
    assert h.registry.peek(PORT) is not None


def test_empty_domain_serves_origin_form_whatever_host_says() -> None:
    h = Harness(session_api={"enabled": True, "domain": ""})
    for host in (b"127.0.0.1:10201", b"portmapper", b"example.com"):
        proto, client = h.client()
        proto.dataReceived(b"GET /session/ HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert head_of(client.value())[0] == b"HTTP/1.1 200 OK", host
    # Absolute-form requests are still proxied, even to a host named portmapper.
    proto, _ = h.client()
    proto.dataReceived(get("/session/"))
    assert len(h.reactor.tcpClients) == 1


def test_connect_to_domain_then_plain_http_inside() -> None:
    h = Harness(session_api=ON)
    proto, client = h.client()
    proto.dataReceived(b"CONNECT portmapper:80 HTTP/1.1\r\nHost: portmapper:80\r\n\r\n")
    assert client.value() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    client.clear()
    proto.dataReceived(b"GET /session/new HTTP/1.1\r\nHost: portmapper\r\n\r\n")
    first, _, body = head_of(client.value())
    assert first == b"HTTP/1.1 200 OK"
    assert json.loads(body)["session_id"] == h.registry.peek(PORT).id
    assert h.reactor.tcpClients == []
    assert not client.disconnecting


class TLSRecorder(StringTransport):
    """
    A transport that records ``startTLS`` and what its TLS layer is given.
    """

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        self.tls: list[Any] = []
        self.protocol = AccumulatingProtocol()

    def startTLS(self, options: Any) -> None:
        self.tls.append(options)
        self.protocol.data = b""


@pytest.mark.parametrize("early", [False, True], ids=["after-the-answer", "with-the-connect"])
@pytest.mark.parametrize("name", ["PortMapper", "portmapper."])
def test_connect_to_domain_then_tls_inside(early: bool, name: str) -> None:
    """
    A tunnel to the API's domain whose client starts TLS (a record of type
    22 first), after the answer or sent along with its CONNECT, gets TLS with
    options for the domain, and the handshake's bytes go to the TLS layer,
    not to the HTTP parser.
    """
    h = Harness(session_api=ON)
    proto = h.factories[PORT].buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = TLSRecorder()
    proto.makeConnection(transport)
    hello = b"\x16\x03\x01\x00\x05hello"
    connect = f"CONNECT {name}:443 HTTP/1.1\r\nHost: {name}:443\r\n\r\n".encode()
    if early:
        proto.dataReceived(connect + hello)
    else:
        proto.dataReceived(connect)
        assert transport.tls == []
        proto.dataReceived(hello)
    assert transport.value() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    (options,) = transport.tls
    assert options is h.factories[PORT].session_api.certificates.server_options("portmapper")
    assert transport.protocol.data == hello
    assert not transport.disconnecting
    proto.dataReceived(b"GET /session/ HTTP/1.1\r\nHost: portmapper\r\n\r\n")
    assert b"HTTP/1.1 200 OK" in transport.value()  # what TLS decrypted is served


def test_tls_offered_but_plain_http_inside() -> None:
    h = Harness(session_api=ON)
    proto = h.factories[PORT].buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = TLSRecorder()
    proto.makeConnection(transport)
    proto.dataReceived(b"CONNECT portmapper:443 HTTP/1.1\r\nHost: portmapper:443\r\n\r\n")
    proto.dataReceived(b"GET /session/ HTTP/1.1\r\nHost: portmapper\r\n\r\n")
    proto.dataReceived(b"\x16 later bytes are never TLS: a bad request")
    assert transport.tls == []
    assert b"HTTP/1.1 200 OK" in transport.value()


@pytest.mark.parametrize("path", ["/session/new", "/session/reset"])
def test_replacing_a_session_closes_its_tunnels(path: str) -> None:
    """
    A worker's tunnels cannot change session, so replacing or dropping the
    session closes them (and a CONNECT still opening); a plain keep-alive
    connection of the old session stays open, as its next request takes the
    new session; other ports' tunnels are untouched.
    """
    h = Harness(session_api=ON)
    tunnel, tunnel_client = h.client()
    tunnel.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    up, upstream = h.upstream()
    up.dataReceived(b"HTTP/1.1 200 Connection established\r\n\r\n")
    opening, opening_client = h.client()
    opening.dataReceived(b"CONNECT example.org:443 HTTP/1.1\r\n\r\n")
    _, opening_upstream = h.upstream()
    plain, plain_client = h.client()
    plain.dataReceived(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    plain_up, _ = h.upstream()
    plain_up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    other, other_client = h.client(10202)
    other.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    other_up, _ = h.upstream()
    other_up.dataReceived(b"HTTP/1.1 200 Connection established\r\n\r\n")
    old = h.registry.peek(PORT)
    assert {c.state for c in old.connections} == {"tunnel", "connecting", "idle"}

    first, _, _ = api(h, get(path))
    assert first == b"HTTP/1.1 200 OK"
    assert tunnel_client.disconnecting and upstream.disconnecting
    assert opening_client.disconnecting and opening_upstream.disconnecting
    assert not plain_client.disconnecting
    assert not other_client.disconnecting and other.state == "tunnel"


def test_head_has_headers_only() -> None:
    h = Harness(session_api=ON)
    proto, client = h.client()
    proto.dataReceived(get("/session/", method="HEAD"))
    _, lines, body = head_of(client.value())
    assert body == b"" and int(header(lines, b"content-length")[0]) > 0


def test_connection_close_honoured() -> None:
    h = Harness(session_api=ON)
    proto, client = h.client()
    proto.dataReceived(get("/session/").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert client.disconnecting


def test_http_date() -> None:
    assert http_date(1_781_107_783) == "Wed, 10 Jun 2026 16:09:43 GMT"


def test_per_mapping_override_of_global_default() -> None:
    from proxymap.config import parse_config

    raw = {"ports": "1", "upstream": "http://h:1", "session_api": {"domain": "ctl"}}
    config = parse_config({"mapping": [raw], "session_api": {"enabled": True}}, env={})
    assert (config.mappings[0].session_api.enabled, config.mappings[0].session_api.domain) == (
        True,
        "ctl",
    )


def test_new_with_parameters() -> None:
    """
    /session/new?country=de makes a session with that parameter; an
    undeclared or invalid one is a 400 and the session stays as it was.
    """
    h = Harness(
        session_api=ON,
        session_params={"country": ""},
        username="{user}[-country-{country}]-session-{session}",
    )
    first, _, body = api(h, get("/session/new?country=de"))
    assert first == b"HTTP/1.1 200 OK"
    session = h.registry.peek(PORT)
    assert body["params"] == {"country": "de"} and session.params == {"country": "de"}
    assert session.username == f"alice-country-de-session-{session.id}"
    for bad in ("/session/new?city=paris", "/session/new?country=%20x"):
        first, _, body = api(h, get(bad))
        assert first == b"HTTP/1.1 400 Bad Request" and body["error"] == "bad parameter"
        assert h.registry.peek(PORT) is session
    _, _, shown = api(h, get("/session/"))
    assert shown["params"] == {"country": "de"}
    _, _, plain = api(h, get("/session/new"))
    assert plain["params"] == {}


_PATH_PARTS = st.sampled_from(
    ["/session", "/session/", "/session/new", "/session/reset", "/sessions", "/%73ession/new",
     "/session/%2Fnew", "/session/new/", "//session", "/session/..", "/", "", "#frag", "?",
     "?country=de", "?country=", "?country=de&country=fr", "?city=x", "?country=%0d%0aX:%20y",
     "?country=a:b", "?country=%ff", "?=", "?&&", "?country=" + "a" * 70, "%00", "%"]
) | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=12)  # fmt: skip


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]),
    st.lists(_PATH_PARTS, min_size=1, max_size=4),
)
def test_any_api_request_is_answered_and_the_connection_serves_on(
    method: str, parts: list[str]
) -> None:
    """
    Whatever path, query and method a worker sends to the API, it gets an
    answer below 500 on a connection that serves its next request, and a
    session it made renders credentials the vendor can parse.
    """
    h = Harness(
        session_api=ON,
        session_params={"country": ""},
        username="{user}[-country-{country}]-session-{session}",
    )
    proto, client = h.client()
    target = "".join(parts)
    if not target.startswith("/"):
        target = "/" + target
    proto.dataReceived(
        f"{method} http://portmapper{target} HTTP/1.1\r\nHost: portmapper\r\n\r\n".encode()
    )
    status = head_of(client.value())[0]
    if client.disconnecting:  # the HTTP parser refused the head
        assert status == b"HTTP/1.1 400 Bad Request" and not h.reactor.tcpClients
        return
    assert int(status.split(b" ")[1]) < 500, status
    client.clear()
    proto.dataReceived(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    _, upstream = h.upstream()
    _, lines, _ = head_of(upstream.value())
    (value,) = header(lines, b"proxy-authorization")
    username, _, password = base64.b64decode(value.split(b" ")[1]).decode().partition(":")
    session = h.registry.peek(PORT)
    assert session is not None and username == session.username and password == "s3cret"
    assert re.fullmatch(r"alice(-country-[A-Za-z0-9_.]{1,64})?-session-[A-Za-z0-9]+", username)
