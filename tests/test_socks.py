"""
SOCKS5 and SOCKS4/4a: the parsers, and a mapped port speaking them.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import (
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from proxymap.dataplane import socks
from proxymap.dataplane.socks import Socks4Handshake, Socks5Handshake, SocksConnect

from .helpers import FUZZ_EXAMPLES, PORT, Harness, creds, cut, head_of, header


def s5_request(host: bytes | str, port: int, command: int = 1) -> bytes:
    if isinstance(host, str):
        return bytes((5, command, 0, 3, len(host))) + host.encode() + struct.pack("!H", port)
    atyp = 1 if len(host) == 4 else 4
    return bytes((5, command, 0, atyp)) + host + struct.pack("!H", port)


def s4a_request(host: str, port: int, user: bytes = b"") -> bytes:
    return (
        b"\x04\x01"
        + struct.pack("!H", port)
        + b"\x00\x00\x00\x01"
        + user
        + b"\x00"
        + host.encode()
        + b"\x00"
    )


def test_socks5_no_auth_domain() -> None:
    h = Socks5Handshake()
    step = h.feed(b"\x05\x01\x00")
    assert step.reply == b"\x05\x00" and step.connect is None
    step = h.feed(s5_request("example.com", 443) + b"early")
    assert step.connect == SocksConnect(5, "example.com", 443)
    assert step.rest == b"early"


@pytest.mark.parametrize(
    ("address", "host"),
    [(b"\x7f\x00\x00\x01", "127.0.0.1"), (b"\x00" * 15 + b"\x01", "::1")],
)
def test_socks5_ip_addresses(address: bytes, host: str) -> None:
    step = Socks5Handshake().feed(b"\x05\x01\x00" + s5_request(address, 80))
    assert step.connect is not None and step.connect.host == host


def test_socks5_username_password() -> None:
    h = Socks5Handshake()
    assert h.feed(b"\x05\x02\x00\x02").reply == b"\x05\x00"  # no-auth preferred
    h = Socks5Handshake(require_auth=True)
    assert h.feed(b"\x05\x02\x00\x02").reply == b"\x05\x02"
    step = h.feed(b"\x01\x05alice\x02pw" + s5_request("e.com", 80))
    assert step.reply == b"\x01\x00"
    assert step.connect == SocksConnect(5, "e.com", 80, "alice", "pw")
    # Credentials offered to a port that does not need them are accepted too.
    h = Socks5Handshake()
    assert h.feed(b"\x05\x01\x02").reply == b"\x05\x02"


def test_socks5_auth_required_but_not_offered() -> None:
    step = Socks5Handshake(require_auth=True).feed(b"\x05\x01\x00")
    assert step.reply == b"\x05\xff" and step.close


@pytest.mark.parametrize(("command", "code"), [(2, 0x07), (3, 0x07)])
def test_socks5_bind_and_udp_refused(command: int, code: int) -> None:
    step = Socks5Handshake().feed(b"\x05\x01\x00" + s5_request("e.com", 80, command))
    assert step.reply[-10:] == socks.socks5_reply(code) and step.close


def test_socks5_bad_address_type() -> None:
    step = Socks5Handshake().feed(b"\x05\x01\x00\x05\x01\x00\x09\x00\x00")
    assert step.reply.endswith(socks.socks5_reply(0x08)) and step.close


def test_socks4_and_4a() -> None:
    step = Socks4Handshake().feed(b"\x04\x01\x00\x50\x7f\x00\x00\x01bob\x00")
    assert step.connect == SocksConnect(4, "127.0.0.1", 80, "bob", None)
    step = Socks4Handshake().feed(s4a_request("example.com", 443) + b"tls")
    assert step.connect == SocksConnect(4, "example.com", 443, None, None)
    assert step.rest == b"tls"
    step = Socks4Handshake().feed(b"\x04\x02\x00\x50\x7f\x00\x00\x01\x00")
    assert step.reply == socks.socks4_reply(False) and step.close
    step = Socks4Handshake().feed(b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 300)
    assert step.close


@pytest.mark.parametrize(
    ("make", "message", "reply"),
    [
        # Username/password sub-negotiation of a version other than 1.
        (lambda: Socks5Handshake(True), b"\x05\x01\x02\x02\x01u\x01p", b"\x05\x02\x01\x01"),
        # Host names that are not names: not ASCII, or with a path, user or port in them.
        (Socks5Handshake, b"\x05\x01\x00" + s5_request("\u00e9.com", 80), None),
        (Socks5Handshake, b"\x05\x01\x00" + s5_request("e.com/x", 80), None),
        (Socks5Handshake, b"\x05\x01\x00" + s5_request("u@e.com", 80), None),
        (Socks5Handshake, b"\x05\x01\x00" + s5_request("e.com:81", 80), None),
        (Socks5Handshake, b"\x05\x01\x00" + s5_request("", 80), None),
        (Socks5Handshake, b"\x05\x01\x00" + s5_request("e.com", 0), None),
        # SOCKS4a: a host name that is empty, not ASCII, or never ends.
        (Socks4Handshake, s4a_request("", 80), socks.socks4_reply(False)),
        (Socks4Handshake, s4a_request("\u00e9.com", 80), socks.socks4_reply(False)),
        (Socks4Handshake, s4a_request("e.com", 80)[:-1] + b"e" * 300, socks.socks4_reply(False)),
    ],
)
def test_malformed_requests_get_a_reply_and_a_close(
    make: object, message: bytes, reply: bytes | None
) -> None:
    """
    A request the port cannot act on is answered with the protocol's
    refusal and the connection closed, rather than left waiting or sent on.
    """
    step = make().feed(message)  # type: ignore[operator]
    expected = socks.socks5_reply(socks.HOST_UNREACHABLE) if reply is None else reply
    assert step.reply.endswith(expected)
    assert step.close and step.connect is None


VALID = [
    (Socks5Handshake, b"\x05\x01\x00" + s5_request("example.com", 443)),
    (lambda: Socks5Handshake(True), b"\x05\x01\x02\x01\x01u\x01p" + s5_request("e.com", 1)),
    (Socks4Handshake, s4a_request("example.com", 443, b"user")),
]


@given(st.sampled_from(VALID), st.data())
def test_any_split_parses_the_same(case: tuple[object, bytes], data: st.DataObject) -> None:
    """
    However a handshake is cut into reads, it waits for the rest and parses
    the same CONNECT.
    """
    make, message = case
    cuts = sorted(data.draw(st.sets(st.integers(1, len(message) - 1), max_size=6)))
    handshake = make()  # type: ignore[operator]
    steps = [handshake.feed(piece) for piece in cut(message, cuts)]
    assert all(s.connect is None and not s.close for s in steps[:-1])
    assert steps[-1].connect is not None and not steps[-1].close


@settings(max_examples=FUZZ_EXAMPLES)
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_arbitrary_bytes_never_crash(a: bytes, b: bytes) -> None:
    for make in (Socks5Handshake, lambda: Socks5Handshake(True), Socks4Handshake):
        handshake = make()
        handshake.feed(b"\x05" + a)
        handshake.feed(b)


# ---------------------------------------------------------------- on a port


def socks5_client(h: Harness, target: str = "example.com", port: int = 443) -> tuple:
    proto, client = h.client()
    proto.dataReceived(b"\x05\x01\x00")
    proto.dataReceived(s5_request(target, port))
    return proto, client


def test_socks5_connect_through_the_session() -> None:
    """
    A SOCKS5 CONNECT becomes the port's CONNECT upstream, with the session's
    credentials and the host name unresolved; the reply comes when the
    vendor accepts; then bytes flow both ways.
    """
    h = Harness()
    proto, client = socks5_client(h)
    assert client.value() == b"\x05\x00"
    up, upstream = h.upstream()
    first, lines, _ = head_of(upstream.value())
    assert first == b"CONNECT example.com:443 HTTP/1.1"
    assert header(lines, b"proxy-authorization") == [creds("sess0001")]
    up.dataReceived(b"HTTP/1.1 200 Connection established\r\n\r\n")
    assert client.value() == b"\x05\x00" + socks.socks5_reply(0)
    proto.dataReceived(b"hello")
    up.dataReceived(b"world")
    assert upstream.value().endswith(b"\r\n\r\nhello")
    assert client.value().endswith(b"world")
    assert proto.protocol == "socks5" and proto.state == "tunnel"
    assert h.registry.current(PORT).connections == {proto}


def test_socks5_long_host_name_goes_upstream_as_given() -> None:
    """
    A name with a label over 63 characters is the vendor's to refuse: it
    used to fail an IDNA encoding here and drop the client without a reply.
    """
    name = "a" * 64 + ".example"
    h = Harness()
    _, client = socks5_client(h, name, 80)
    up, upstream = h.upstream()
    first, _, _ = head_of(upstream.value())
    assert first == b"CONNECT " + name.encode() + b":80 HTTP/1.1"
    up.dataReceived(b"HTTP/1.1 200 Connection established\r\n\r\n")
    assert client.value() == b"\x05\x00" + socks.socks5_reply(0)


def test_socks4a_connect() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(s4a_request("example.com", 80, b"anyone"))
    up, upstream = h.upstream()
    assert upstream.value().startswith(b"CONNECT example.com:80 HTTP/1.1")
    up.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    assert client.value() == socks.socks4_reply(True)


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (lambda h: h.fail_connect(ConnectionRefusedError()), socks.CONNECTION_REFUSED),
        (lambda h: h.fail_connect(TimeoutError()), socks.TTL_EXPIRED),
        (lambda h: h.upstream()[0].dataReceived(b"HTTP/1.1 407 No\r\n\r\n"), socks.GENERAL_FAILURE),
        (lambda h: h.upstream()[0].dataReceived(b"HTTP/1.1 403 No\r\n\r\n"), socks.NOT_ALLOWED),
        (
            lambda h: h.upstream()[0].dataReceived(b"HTTP/1.1 502 No route\r\n\r\n"),
            socks.HOST_UNREACHABLE,
        ),
        (lambda h: h.upstream()[0].dataReceived(b"HTTP/1.1 504 Late\r\n\r\n"), socks.TTL_EXPIRED),
    ],
    ids=["refused", "timeout", "vendor-407", "vendor-403", "vendor-502", "vendor-504"],
)
def test_failures_map_to_reply_codes(failure: object, code: int) -> None:
    h = Harness()
    _proto, client = socks5_client(h)
    failure(h)  # type: ignore[operator]
    assert client.value() == b"\x05\x00" + socks.socks5_reply(code)
    assert client.disconnecting


def test_socks4_failure() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(s4a_request("example.com", 80))
    h.fail_connect(ConnectionRefusedError())
    assert client.value() == socks.socks4_reply(False) and client.disconnecting


def test_socks5_to_the_session_api_is_answered_locally() -> None:
    h = Harness(session_api={"enabled": True, "domain": "portmapper"})
    proto, client = socks5_client(h, "portmapper", 80)
    assert client.value() == b"\x05\x00" + socks.socks5_reply(0)
    client.clear()
    proto.dataReceived(b"GET /session/ HTTP/1.1\r\nHost: portmapper\r\n\r\n")
    assert head_of(client.value())[0] == b"HTTP/1.1 200 OK"
    assert b'"session_id"' in client.value()
    assert h.reactor.tcpClients == []


def test_protocols_can_be_switched_off() -> None:
    h = Harness(protocols=["http"])
    proto, client = h.client()
    proto.dataReceived(b"\x05\x01\x00")
    proto.dataReceived(s5_request("e.com", 80))
    assert h.reactor.tcpClients == []
    h = Harness(protocols=["socks5"])
    proto, client = h.client()
    proto.dataReceived(b"GET http://e.com/ HTTP/1.1\r\n\r\n")
    assert client.value() == b"" and client.disconnecting


def test_a_tls_handshake_is_closed_at_once() -> None:
    """
    A client that takes the port for an HTTPS proxy (curl -x https://...)
    opens with a TLS handshake; it is closed at once, not left to the head
    timeout, and nothing goes upstream.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert client.value() == b"" and client.disconnecting
    assert h.reactor.tcpClients == []


request_prefixes = st.sampled_from([b"\x05", b"\x04", b"\x05\x01\x00", b"\x05\x01\x02"])


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=FUZZ_EXAMPLES, deadline=None)
@given(request_prefixes, st.lists(st.binary(max_size=80), max_size=4))
def test_port_survives_arbitrary_socks_input(prefix: bytes, reads: list[bytes]) -> None:
    h = Harness()
    proto, _client = h.client()
    proto.dataReceived(prefix)
    for data in reads:
        proto.dataReceived(data)
    for index in range(len(h.reactor.tcpClients)):
        up, _ = h.upstream(index)
        up.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    _proto2, client2 = socks5_client(h)
    up, _ = h.upstream()
    up.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    assert client2.value() == b"\x05\x00" + socks.socks5_reply(0)


# ---------------------------------------------------------------- SOCKS5 upstreams

OK_REPLY = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


def socks_upstream_handshake(h: Harness, index: int = -1) -> tuple:
    """
    Play the vendor's side of RFC 1928/1929 up to the CONNECT; return the
    upstream leg, its transport and the credentials and request it sent.
    """
    up, upstream = h.upstream(index)
    assert upstream.value() == b"\x05\x01\x02"
    upstream.clear()
    up.dataReceived(b"\x05\x02")
    auth = upstream.value()
    upstream.clear()
    up.dataReceived(b"\x01\x00")
    request = upstream.value()
    upstream.clear()
    return up, upstream, auth, request


def test_plain_http_over_a_socks5_upstream() -> None:
    h = Harness(upstream="socks5://gw.example.com:1080")
    proto, client = h.client()
    proto.dataReceived(b"GET http://example.com/x?y HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert h.reactor.tcpClients[-1][:2] == ("192.0.2.10", 1080)
    up, upstream, auth, request = socks_upstream_handshake(h)
    user = b"alice-session-sess0001"
    assert auth == b"\x01" + bytes((len(user),)) + user + b"\x06s3cret"
    assert request == b"\x05\x01\x00\x03\x0bexample.com\x00\x50"  # by name: no local DNS
    up.dataReceived(OK_REPLY)
    first, lines, _ = head_of(upstream.value())
    assert first == b"GET /x?y HTTP/1.1"  # origin form, no proxy credentials
    assert header(lines, b"proxy-authorization") == []
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert client.value().endswith(b"\r\n\r\nok")
    # Same target, same session: reused.  Another target: another connection.
    proto.dataReceived(b"GET http://example.com/z HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert len(h.reactor.tcpClients) == 1
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    proto.dataReceived(b"GET http://other.example/ HTTP/1.1\r\nHost: other.example\r\n\r\n")
    assert len(h.reactor.tcpClients) == 2


def test_connect_and_socks_clients_over_a_socks5_upstream() -> None:
    h = Harness(upstream="socks5://gw.example.com:1080")
    proto, client = socks5_client(h, "example.com", 443)
    up, upstream, _, request = socks_upstream_handshake(h)
    assert request.endswith(b"example.com\x01\xbb")
    up.dataReceived(OK_REPLY + b"server-first")
    assert client.value() == b"\x05\x00" + socks.socks5_reply(0) + b"server-first"
    proto.dataReceived(b"client-bytes")
    assert upstream.value() == b"client-bytes"


BOUND = [
    b"\x01" + bytes(4),  # the bound address as IPv4,
    b"\x04" + bytes(16),  # as IPv6,
    b"\x03\x0bexample.com",  # or as a name
]


@given(st.sampled_from(BOUND), st.data())
def test_the_socks5_upstreams_answers_in_any_reads(bound: bytes, data: st.DataObject) -> None:
    """
    However the vendor's answers are cut into reads, and whichever form its
    reply gives the bound address in, the tunnel opens once the reply is
    whole, and bytes the target sent with its tail reach the client.
    """
    h = Harness(upstream="socks5://gw.example.com:1080")
    proto, client = h.client()
    proto.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    up, upstream = h.upstream()
    reply = b"\x05\x00\x00" + bound + b"\x01\xbb"
    # Each answer, and what proxymap sends once it is whole (and only then).
    stages = [(b"\x05\x02", b"", b"\x01"), (b"\x01\x00", b"", b"\x05"), (reply, b"first", b"")]
    for answer, after, next_sent in stages:
        cuts = sorted(data.draw(st.sets(st.integers(1, len(answer) - 1), max_size=4)))
        pieces = cut(answer, cuts)
        for piece in pieces[:-1]:
            upstream.clear()
            up.dataReceived(piece)
            assert upstream.value() == b"" and client.value() == b""
        upstream.clear()
        up.dataReceived(pieces[-1] + after)
        assert upstream.value().startswith(next_sent)
    assert client.value() == b"HTTP/1.1 200 Connection established\r\n\r\nfirst"


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"\x05\xff", b"502"),  # no acceptable method
        (b"\x05\x02|auth-fail", b"502"),
        (b"\x05\x02|\x01\x00|\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00", b"502"),
        (b"\x05\x02|\x01\x00|\x05\x06\x00\x01\x00\x00\x00\x00\x00\x00", b"504"),
        (b"\x05\x02|\x01\x00|\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00", b"403"),
    ],
)
def test_socks5_upstream_failures(answer: bytes, status: bytes) -> None:
    h = Harness(upstream="socks5://gw.example.com:1080")
    proto, client = h.client()
    proto.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    up, _ = h.upstream()
    for part in answer.split(b"|"):
        up.dataReceived(b"\x01\x01" if part == b"auth-fail" else part)
    assert head_of(client.value())[0].split(b" ")[1] == status
    assert b"s3cret" not in client.value()


def test_a_long_host_name_over_a_socks5_upstream() -> None:
    """
    The SOCKS5 request to the vendor names the target as the client did,
    whatever its labels' length; the origin gets the target's Host.
    """
    h = Harness(upstream="socks5://gw.example.com:1080")
    proto, _ = h.client()
    name = b"a" * 64 + b".example"
    proto.dataReceived(b"GET http://" + name + b"/ HTTP/1.1\r\nHost: other.example\r\n\r\n")
    up, upstream, _, request = socks_upstream_handshake(h)
    assert request == b"\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\x00\x50"
    up.dataReceived(OK_REPLY)
    _, lines, _ = head_of(upstream.value())
    assert header(lines, b"host") == [name]


def test_socks5_upstream_config() -> None:
    from proxymap.config import ConfigError

    from .helpers import mapping

    m = mapping(upstream="socks5://gw.example.com")
    assert (m.upstream.scheme, m.upstream.port, m.socks_resolve) == ("socks5", 1080, "remote")
    with pytest.raises(ConfigError, match="socks_resolve"):
        mapping(upstream="socks5://h:1", socks_resolve="sometimes")


def test_socks5_credentials_judged_at_the_auth_step() -> None:
    h = Socks5Handshake(require_auth=True, check=lambda user, password: password == "right")
    h.feed(b"\x05\x01\x02")
    step = h.feed(b"\x01\x01u\x05wrong")
    assert step.reply == b"\x01\x01" and step.close


def test_socks5_upstream_resolves_targets_locally_once() -> None:
    """
    With ``socks_resolve = "local"`` the target goes to the vendor as an
    address, looked up in the service's cache of names: a second connection
    to the same target is sent at once, without another lookup.
    """
    h = Harness(upstream="socks5://gw.example.com:1080", socks_resolve="local")
    h.addresses["example.com"] = "198.51.100.7"
    proto, _client = h.client()
    proto.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    _up, upstream, _auth, request = socks_upstream_handshake(h)
    assert request == b""  # waiting for the name, answered on a later turn
    h.reactor.advance(0)
    assert upstream.value() == s5_request(bytes((198, 51, 100, 7)), 443)
    proto, _client = h.client()
    proto.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    _up, _upstream, _auth, request = socks_upstream_handshake(h, 1)
    assert request == s5_request(bytes((198, 51, 100, 7)), 443)
    assert h.looked_up.count("example.com") == 1


def test_socks5_upstream_target_that_does_not_resolve() -> None:
    h = Harness(upstream="socks5://gw.example.com:1080", socks_resolve="local")
    proto, client = h.client()
    proto.dataReceived(b"CONNECT nowhere.invalid:443 HTTP/1.1\r\n\r\n")
    _up, upstream, _auth, request = socks_upstream_handshake(h)
    h.reactor.advance(0)
    assert request == b"" and upstream.value() == b""
    first, _, body = head_of(client.value())
    assert first.startswith(b"HTTP/1.1 502")
    assert b"cannot look up the target host nowhere.invalid" in body
    assert upstream.disconnecting
    # The port keeps serving.
    proto, client = h.client()
    proto.dataReceived(b"CONNECT 192.0.2.99:443 HTTP/1.1\r\n\r\n")
    _up, _upstream, _auth, request = socks_upstream_handshake(h)
    assert request == s5_request(bytes((192, 0, 2, 99)), 443)


@pytest.mark.parametrize("found", [True, False], ids=["found", "not-found"])
def test_socks5_upstream_closed_while_resolving_sends_nothing(found: bool) -> None:
    """
    A client gone while its target's name is looked up: the answer that
    comes later, an address or a failure, writes nothing and tells no one.
    """
    h = Harness(upstream="socks5://gw.example.com:1080", socks_resolve="local")
    proto, client = h.client()
    proto.dataReceived(b"CONNECT slow.example:443 HTTP/1.1\r\n\r\n")
    up, upstream, _auth, _request = socks_upstream_handshake(h)
    proto.connectionLost(Failure(ConnectionDone()))
    up.connectionLost(Failure(ConnectionDone()))
    upstream.clear()
    client.clear()
    with capturedLogs() as events:
        if found:
            h.pending["slow.example"].callback("198.51.100.8")
        else:
            h.pending["slow.example"].errback(DNSLookupError("slow.example"))
        h.reactor.advance(0)
    assert upstream.value() == b"" and client.value() == b""
    assert not [e for e in events if "target host" in str(e.get("message", ""))]
