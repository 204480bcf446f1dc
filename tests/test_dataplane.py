"""
The data plane in memory: a mapped port's client and upstream legs on
StringTransports and a MemoryReactorClock, and tunnels over iosim.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
    UserError,
)
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.test import iosim

from proxymap.dataplane import flow
from proxymap.dataplane.http import MAX_HEAD_SIZE
from proxymap.dataplane.upstream import UpstreamProtocol
from proxymap.sessions import EndReason

from .helpers import (
    FUZZ_EXAMPLES,
    PORT,
    UPSTREAM_ADDRESS,
    UPSTREAM_HOST,
    UPSTREAM_PORT,
    Harness,
    creds,
    cut,
    head_of,
    header,
)

GET = b"GET http://example.com/page?q=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"


def answered(client: StringTransport, status: bytes, text: bytes) -> None:
    """
    proxymap answered ``client`` itself: ``status``, and ``text`` in the body.
    """
    first, _, body = head_of(client.value())
    assert first == b"HTTP/1.1 " + status
    assert text in body


def test_forwards_absolute_form_with_session_credentials() -> None:
    """
    A request goes to the vendor's gateway in absolute form, carrying the
    port's session credentials and none of the client's proxy fields.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(
        b"GET http://example.com/a HTTP/1.1\r\nHost: example.com\r\n"
        b"Proxy-Authorization: Basic Y2xpZW50OnNlY3JldA==\r\nProxy-Connection: keep-alive\r\n\r\n"
    )
    assert [(c[0], c[1]) for c in h.reactor.tcpClients] == [(UPSTREAM_ADDRESS, UPSTREAM_PORT)]
    up, upstream = h.upstream()
    first, lines, rest = head_of(upstream.value())
    assert first == b"GET http://example.com/a HTTP/1.1"
    assert header(lines, b"proxy-authorization") == [creds("sess0001")]
    assert header(lines, b"proxy-connection") == []
    assert header(lines, b"host") == [b"example.com"]
    assert rest == b""

    up.dataReceived(OK)
    first, lines, body = head_of(client.value())
    assert first == b"HTTP/1.1 200 OK"
    assert body == b"hello"
    assert not client.disconnecting


def test_the_vendor_sees_the_targets_host_not_the_clients() -> None:
    """
    A Host naming another host than the request's target is replaced on the
    way to the vendor; a request without one (HTTP/1.0) gets the target's,
    whatever its length.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"GET http://example.com/a HTTP/1.1\r\nHost: other.example\r\n\r\n")
    up, upstream = h.upstream()
    _, lines, _ = head_of(upstream.value())
    assert header(lines, b"host") == [b"example.com"]
    up.dataReceived(OK)
    long_name = b"a" * 64 + b".example"
    proto.dataReceived(b"GET http://" + long_name + b"/ HTTP/1.0\r\n\r\n")
    _, lines, _ = head_of(upstream.value().rpartition(b"\r\n\r\nGET ")[2])
    assert header(lines, b"host") == [long_name]
    up.dataReceived(OK)
    assert client.value().count(b"200 OK") == 2


def test_keep_alive_reuses_upstream_connection() -> None:
    """
    Requests of one session on one client connection share one upstream connection.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, upstream = h.upstream()
    up.dataReceived(OK)
    proto.dataReceived(GET)
    assert len(h.reactor.tcpClients) == 1
    assert upstream.value().count(b"GET http://example.com/page?q=1") == 2
    up.dataReceived(OK)
    assert client.value().count(b"hello") == 2
    session = h.registry.current(PORT)
    assert session.requests == 2
    assert proto.requests == 2


def test_rotation_opens_new_upstream_connection() -> None:
    """
    After the session expires, the next request on the same client connection
    uses a new upstream connection with the new session's credentials, and the
    old upstream connection is closed.
    """
    h = Harness(lifetime="90s")
    proto, client = h.client()
    proto.dataReceived(GET)
    old, old_transport = h.upstream()
    old.dataReceived(OK)
    h.reactor.advance(90)
    assert h.registry.peek(PORT) is None

    proto.dataReceived(GET)
    assert len(h.reactor.tcpClients) == 2
    assert old_transport.disconnecting
    new, new_transport = h.upstream()
    _, lines, _ = head_of(new_transport.value())
    assert header(lines, b"proxy-authorization") == [creds("sess0002")]
    new.dataReceived(OK)
    assert client.value().count(b"hello") == 2


def test_each_port_has_its_own_session() -> None:
    """
    Two ports of one mapping send different session credentials.
    """
    h = Harness()
    seen = []
    for port in (10201, 10202):
        proto, _ = h.client(port)
        proto.dataReceived(GET)
        _, upstream = h.upstream()
        seen.append(header(head_of(upstream.value())[1], b"proxy-authorization"))
    assert seen == [[creds("sess0001")], [creds("sess0002")]]


def test_pipelined_requests_answered_in_order() -> None:
    """
    Pipelined requests wait until the response before them is complete, so
    responses come back in request order.
    """
    h = Harness()
    proto, client = h.client()
    a = b"GET http://example.com/a HTTP/1.1\r\nHost: example.com\r\n\r\n"
    b = b"GET http://example.com/b HTTP/1.1\r\nHost: example.com\r\n\r\n"
    proto.dataReceived(a + b)
    up, upstream = h.upstream()
    assert b"/b" not in upstream.value()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA")
    assert b"GET http://example.com/b" in upstream.value()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB")
    out = client.value()
    assert out.index(b"\r\n\r\nA") < out.index(b"\r\n\r\nB")


def test_chunked_request_body_streams_and_next_request_follows() -> None:
    """
    A chunked request body is forwarded as it arrives; the request after it is
    recognised where the body's framing ends.
    """
    h = Harness()
    proto, _client = h.client()
    proto.dataReceived(
        b"POST http://example.com/up HTTP/1.1\r\nHost: example.com\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel"
    )
    up, upstream = h.upstream()
    assert upstream.value().endswith(b"\r\n\r\n5\r\nhel")
    proto.dataReceived(b"lo\r\n0\r\n\r\n" + GET)
    assert upstream.value().endswith(b"5\r\nhello\r\n0\r\n\r\n")
    up.dataReceived(OK)
    assert upstream.value().endswith(
        GET.split(b"\r\n")[0]
        + b"\r\n"
        + GET.split(b"\r\n", 1)[1][:-2]
        + b"Proxy-Authorization: "
        + creds("sess0001")
        + b"\r\n\r\n"
    )


def test_content_length_body_split_across_reads() -> None:
    h = Harness()
    proto, _ = h.client()
    proto.dataReceived(
        b"PUT http://example.com/x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 10\r\n\r\n01234"
    )
    _up, upstream = h.upstream()
    proto.dataReceived(b"56789")
    assert upstream.value().endswith(b"\r\n\r\n0123456789")
    # Every byte sent upstream counts, the head as the body.
    assert proto.session is not None and proto.session.bytes_up == len(upstream.value())


def test_chunked_response_relayed_raw_to_http11() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, _ = h.upstream()
    body = b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
    up.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    _, lines, rest = head_of(client.value())
    assert header(lines, b"transfer-encoding") == [b"chunked"]
    assert rest == body
    assert proto.state == "idle"


def test_chunked_response_decoded_for_http10() -> None:
    """
    An HTTP/1.0 client cannot read chunked framing: it gets the data and a close.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"GET http://example.com/ HTTP/1.0\r\n\r\n")
    up, upstream = h.upstream()
    assert header(head_of(upstream.value())[1], b"host") == [b"example.com"]
    up.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    up.dataReceived(b"2\r\nde\r\n0\r\n\r\n")
    _, lines, rest = head_of(client.value())
    assert header(lines, b"transfer-encoding") == []
    assert header(lines, b"connection") == [b"close"]
    assert rest == b"abcde"
    assert client.disconnecting


def test_http10_keep_alive() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"GET http://example.com/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    up, _ = h.upstream()
    up.dataReceived(OK)
    assert header(head_of(client.value())[1], b"connection") == [b"keep-alive"]
    assert not client.disconnecting


def test_client_connection_close_honoured() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    up, upstream = h.upstream()
    assert header(head_of(upstream.value())[1], b"connection") == []
    up.dataReceived(OK)
    assert header(head_of(client.value())[1], b"connection") == [b"close"]
    assert client.disconnecting


@pytest.mark.parametrize(
    ("closing", "answer", "lasts"),
    [
        # The whole response in one read, after which the client leaves.
        (True, [OK], [b"\r\n\r\nhello"]),
        # The body in later reads: only its end is the last write.
        (True, [OK[:-3], b"llo"], [b"llo"]),
        # A kept client connection has no last write.
        (False, [OK], []),
        (False, [OK[:-3], b"llo"], []),
    ],
)
def test_the_response_that_ends_a_connection_goes_out_last(
    monkeypatch: pytest.MonkeyPatch, closing: bool, answer: list[bytes], lasts: list[bytes]
) -> None:
    """
    The bytes that end a response after which the client connection closes
    go through flow.send with last (their FIN travels with them: see test_flow),
    and nothing else does.
    """
    sent_last: list[bytes] = []
    send = flow.send

    def spy(transport: object, data: bytes, last: bool = False) -> None:
        if last:
            sent_last.append(data)
        send(transport, data, last)

    monkeypatch.setattr(flow, "send", spy)
    h = Harness()
    proto, client = h.client()
    request = GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") if closing else GET
    proto.dataReceived(request)
    up, _ = h.upstream()
    for data in answer:
        up.dataReceived(data)
    assert len(sent_last) == len(lasts)
    assert [data[-len(end) :] for data, end in zip(sent_last, lasts, strict=True)] == lasts
    assert client.value().endswith(b"hello")
    assert client.disconnecting is closing


def test_hop_by_hop_fields_removed_both_ways() -> None:
    """
    Connection, Keep-Alive, TE, Upgrade and the fields Connection names stay
    on their hop; end-to-end fields pass.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n"
        b"Connection: X-Hop, keep-alive\r\n"
        b"X-Hop: 1\r\nKeep-Alive: 300\r\nTE: trailers\r\nUpgrade: h2c\r\nX-End: 2\r\n\r\n"
    )
    up, upstream = h.upstream()
    _, lines, _ = head_of(upstream.value())
    names = {line.split(b":")[0].lower() for line in lines}
    assert names == {b"host", b"x-end", b"proxy-authorization"}
    up.dataReceived(
        b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Authenticate: Basic\r\nX-Kept: k\r\nContent-Length: 0\r\n\r\n"
    )
    _, lines, _ = head_of(client.value())
    names = {line.split(b":")[0].lower() for line in lines}
    assert names == {b"x-kept", b"content-length"}


def test_head_response_has_no_body() -> None:
    h = Harness()
    proto, _client = h.client()
    proto.dataReceived(b"HEAD http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    up, _ = h.upstream()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert proto.state == "idle"
    proto.dataReceived(GET)
    assert len(h.reactor.tcpClients) == 1


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        (lambda h: h.fail_connect(ConnectionRefusedError()), b"502 Bad Gateway"),
        (lambda h: h.upstream()[0].dataReceived(b"SSH-2.0\r\n\r\n"), b"502 Bad Gateway"),
        (lambda h: h.reactor.advance(10), b"504 Gateway Timeout"),
    ],
    ids=["refused", "garbage", "connect timeout"],
)
def test_proxymaps_own_answer_to_head_has_no_body(
    fault: Callable[[Harness], object], status: bytes
) -> None:
    """
    RFC 9110 9.3.2: whatever answers a HEAD sends no body, proxymap's own
    error answers included; the client would read the text as the start of
    whatever came next.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"HEAD http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    fault(h)
    first, lines, body = head_of(client.value())
    assert first == b"HTTP/1.1 " + status
    assert int(header(lines, b"content-length")[0]) > 0  # the length a GET would get
    assert body == b""
    assert client.disconnecting


def test_interim_response_forwarded() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(
        b"POST http://example.com/ HTTP/1.1\r\nHost: example.com\r\nExpect: 100-continue\r\n"
        b"Content-Length: 2\r\n\r\n"
    )
    up, _upstream = h.upstream()
    up.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert client.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    proto.dataReceived(b"ok")
    up.dataReceived(OK)
    assert client.value().endswith(b"hello")


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        (lambda h, up: up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"), b"502"),
        (lambda h, up: up.connectionLost(Failure(ConnectionDone())), b"502"),
        (lambda h, up: h.reactor.advance(301), b"504"),
    ],
    ids=["a malformed final head", "a close", "silence"],
)
def test_an_interim_answer_still_lets_a_gateway_error_follow(
    fault: Callable[[Harness, UpstreamProtocol], object], status: bytes
) -> None:
    """
    A 1xx is not the answer: when the vendor fails after one, the client
    still gets a final 502 or 504 after it, not a bare close.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, _ = h.upstream()
    up.dataReceived(EARLY_HINTS)
    fault(h, up)
    out = client.value()
    assert out.startswith(EARLY_HINTS)
    assert out[len(EARLY_HINTS) :].startswith(b"HTTP/1.1 " + status)
    assert client.disconnecting


def test_response_until_close() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, _upstream = h.upstream()
    up.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nstream")
    up.dataReceived(b"ing")
    up.connectionLost(Failure(ConnectionLost()))
    _, lines, rest = head_of(client.value())
    assert rest == b"streaming"
    assert header(lines, b"connection") == [b"close"]
    assert client.disconnecting


def test_connect_refused_is_502_and_port_keeps_serving() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    h.fail_connect(ConnectionRefusedError())
    answered(client, b"502 Bad Gateway", b"cannot connect to the upstream gw.example.com:10000")
    assert client.disconnecting
    proto2, client2 = h.client()
    proto2.dataReceived(GET)
    up, _ = h.upstream()
    up.dataReceived(OK)
    assert client2.value().endswith(b"hello")


def test_connect_timeout_is_504() -> None:
    h = Harness(connect_timeout="3s")
    proto, client = h.client()
    proto.dataReceived(GET)
    h.fail_connect(TimeoutError())
    assert head_of(client.value())[0] == b"HTTP/1.1 504 Gateway Timeout"


def test_connect_deadline_is_kept_by_the_connections_own_timer() -> None:
    """
    No DelayedCall per upstream connection: the client leg's timer, already
    armed for the head, is pulled in to the connect deadline, gives up
    connecting and answers 504.
    """
    h = Harness(connect_timeout="3s")
    proto, client = h.client()
    h.reactor.advance(1)
    proto.dataReceived(GET)
    assert h.reactor.tcpClients[-1][3] is None
    assert proto.timer_due == 4.0
    connector = h.reactor.connectors[-1]
    h.reactor.advance(2.9)
    assert client.value() == b""
    h.reactor.advance(0.2)
    answered(
        client, b"504 Gateway Timeout", b"timed out connecting to the upstream gw.example.com:10000"
    )
    assert connector.stoppedConnecting
    # Stopping reports the failure again: it is not answered twice.
    h.fail_connect(UserError())
    assert client.value().count(b"HTTP/1.1") == 1
    assert h.factory.upstream_errors == {"timeout": 1}


def test_a_gateway_name_is_looked_up_once_then_connected_to_by_address() -> None:
    """
    The first request to a gateway known by name waits for its lookup and
    goes to the address found; later connections use that address at once.
    """
    h = Harness(upstream="http://new.example.com:10000")
    h.addresses["new.example.com"] = "192.0.2.20"
    proto, client = h.client()
    proto.dataReceived(GET)
    assert h.reactor.tcpClients == []
    h.reactor.advance(0)
    assert [c[:2] for c in h.reactor.tcpClients] == [("192.0.2.20", 10000)]
    up, _ = h.upstream()
    up.dataReceived(OK)
    assert client.value().endswith(b"hello")

    proto2, client2 = h.client()
    proto2.dataReceived(GET)
    assert [c[:2] for c in h.reactor.tcpClients][1:] == [("192.0.2.20", 10000)]
    up2, _ = h.upstream()
    up2.dataReceived(OK)
    assert client2.value().endswith(b"hello")
    assert h.looked_up.count("new.example.com") == 1


def test_a_gateway_name_that_does_not_resolve_is_502_and_the_port_serves_on() -> None:
    h = Harness(upstream="http://nowhere.invalid:10000")
    for _ in range(2):
        proto, client = h.client()
        proto.dataReceived(GET)
        h.reactor.advance(0)
        answered(client, b"502 Bad Gateway", b"cannot look up the upstream host nowhere.invalid")
        assert client.disconnecting
    # The second client failed fast: no second lookup of a name that just failed.
    assert h.looked_up.count("nowhere.invalid") == 1
    assert h.reactor.tcpClients == []
    # The metrics' kind: the gateway cannot be reached, not a bad response.
    assert h.factory.upstream_errors == {"unreachable": 2}


def test_the_connect_deadline_covers_a_lookup_that_hangs() -> None:
    h = Harness(connect_timeout="3s", upstream="http://slow.example.com:10000")
    proto, client = h.client()
    proto.dataReceived(GET)
    h.reactor.advance(3.1)
    answered(
        client,
        b"504 Gateway Timeout",
        b"timed out connecting to the upstream slow.example.com:10000",
    )
    # The answer that comes after all opens nothing.
    h.pending["slow.example.com"].callback("192.0.2.30")
    h.reactor.advance(0)
    assert h.reactor.tcpClients == []


def test_a_client_gone_during_the_lookup_opens_nothing() -> None:
    h = Harness(upstream="http://slow.example.com:10000")
    proto, _ = h.client()
    proto.dataReceived(GET)
    proto.connectionLost(Failure(ConnectionDone()))
    h.pending["slow.example.com"].callback("192.0.2.30")
    h.reactor.advance(0)
    assert h.reactor.tcpClients == []
    # The name is known now: the next client connects at once.
    proto2, _ = h.client()
    proto2.dataReceived(GET)
    assert [c[:2] for c in h.reactor.tcpClients] == [("192.0.2.30", 10000)]


def test_a_connect_that_succeeds_leaves_no_timer_behind() -> None:
    h = Harness(connect_timeout="3s")
    proto, client = h.client()
    proto.dataReceived(GET)
    up, _ = h.upstream()
    up.dataReceived(OK)
    assert client.value().endswith(b"hello")
    h.reactor.advance(10)
    assert not h.reactor.connectors[-1].stoppedConnecting
    assert not client.disconnecting


def test_vendor_407_becomes_502_without_credentials() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, upstream = h.upstream()
    up.dataReceived(
        b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    answered(client, b"502 Bad Gateway", b"rejected")
    assert b"s3cret" not in client.value()
    assert b"alice" not in client.value()
    assert creds("sess0001") not in client.value()
    assert upstream.disconnecting


def test_upstream_closes_before_response_is_502() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, _ = h.upstream()
    up.connectionLost(Failure(ConnectionLost()))
    assert head_of(client.value())[0] == b"HTTP/1.1 502 Bad Gateway"


def test_upstream_closes_mid_response_aborts_client() -> None:
    """
    A truncated response must reach the client as a broken connection, not
    as a complete message.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, _ = h.upstream()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    up.connectionLost(Failure(ConnectionLost()))
    assert client.disconnecting
    assert client.value().endswith(b"partial")
    assert b"502" not in client.value()


def test_garbage_from_upstream_is_502() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, _ = h.upstream()
    up.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert head_of(client.value())[0] == b"HTTP/1.1 502 Bad Gateway"


# What a vendor sent after the response it framed, dressed as a response of
# its own: a vendor bug, or an origin whose bytes the vendor passes on.  Left
# in the connection, it would answer whichever request went over it next.
EXTRA = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


#: The vendor's reads: a response, and the extra bytes in its last read.
WITH_THE_END = [
    pytest.param([OK + EXTRA], id="a whole response in one read"),
    pytest.param([OK[:-3], OK[-3:] + EXTRA], id="the end of a body"),
    pytest.param([CHUNKED + b"5\r\nhello\r\n0\r\n\r\n" + EXTRA], id="chunked, one read"),
    pytest.param([CHUNKED, b"5\r\nhello\r\n0\r\n\r\n" + EXTRA], id="chunked, two reads"),
    pytest.param([b"HTTP/1.1 204 No Content\r\n\r\n" + EXTRA], id="no body"),
]


@pytest.mark.parametrize(
    "reads", [*WITH_THE_END, pytest.param([OK, EXTRA], id="a read of their own")]
)
def test_bytes_after_a_response_never_answer_the_next_request(reads: list[bytes]) -> None:
    """
    Bytes the vendor sent beyond its response (or between responses) are
    dropped with their connection; the client's next request goes over a
    new one and gets that one's answer.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, upstream = h.upstream()
    with capturedLogs() as events:
        for data in reads:
            up.dataReceived(data)
    assert upstream.disconnecting
    assert client.value().count(b"HTTP/1.1 ") == 1
    told = [formatEvent(e) for e in events]
    if len(reads[-1]) > len(EXTRA):  # with the end of the response
        assert told == [
            f"upstream {UPSTREAM_HOST}:{UPSTREAM_PORT} sent more than its response;"
            " closing that connection"
        ]
    else:  # in a read of their own, unasked: closed quietly, as a 408 would be
        assert told == []

    proto.dataReceived(GET)
    assert upstream.value().count(b"GET ") == 1
    assert len(h.reactor.tcpClients) == 2
    up2, _ = h.upstream()
    up2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal")
    assert client.value().endswith(b"\r\n\r\nreal")
    assert b"POISON" not in client.value()
    assert not client.disconnecting


@pytest.mark.parametrize("reads", WITH_THE_END)
def test_a_pipelined_request_never_takes_bytes_that_came_before_it(reads: list[bytes]) -> None:
    """
    The request a client pipelined goes out as the first one's answer ends,
    after the extra bytes that came with that answer: over a new connection.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET + GET)
    up, upstream = h.upstream()
    for data in reads:
        up.dataReceived(data)
    assert upstream.value().count(b"GET ") == 1
    assert len(h.reactor.tcpClients) == 2
    up2, upstream2 = h.upstream()
    assert upstream2.value().count(b"GET ") == 1
    up2.dataReceived(OK)
    assert client.value().count(b"HTTP/1.1 ") == 2
    assert client.value().endswith(b"hello")
    assert b"POISON" not in client.value()


@st.composite
def framed_responses(draw: st.DrawFn) -> bytes:
    """
    A well-framed response: by length, chunked, or without a body.
    """
    body = draw(st.binary(max_size=40))
    kind = draw(st.sampled_from(["length", "chunked", "none"]))
    if kind == "length":
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    if kind == "chunked":
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:7], body[7:]) if c)
        return CHUNKED + chunks + b"0\r\n\r\n"
    return b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n"


def answer_in_reads(response: bytes, extra: bytes, cuts: list[int]) -> tuple[bytes, bool]:
    """
    What the client got when the vendor sent ``response + extra`` in reads
    cut at ``cuts``, and whether its next request reused the connection.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, _ = h.upstream()
    for piece in cut(response + extra, cuts):
        up.dataReceived(piece)
    got = client.value()
    proto.dataReceived(GET)
    return got, len(h.reactor.tcpClients) == 1


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(framed_responses(), st.binary(min_size=1, max_size=60), st.data())
def test_what_follows_a_response_never_reaches_its_client(
    response: bytes, extra: bytes, data: st.DataObject
) -> None:
    """
    However the vendor's bytes are cut into reads, its client gets the
    response and nothing of what followed it, and the connection is not
    used again; the same response alone leaves it in use.
    """
    length = len(response) + len(extra)
    cuts = data.draw(st.lists(st.integers(0, length), max_size=4))
    alone, reused = answer_in_reads(response, b"", [c for c in cuts if c <= len(response)])
    assert reused
    got, reused = answer_in_reads(response, extra, cuts)
    assert got == alone
    assert not reused


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello",
        b"HTTP/1.1 200 OK\nContent-Length: 5\n\r\nhello",
    ],
)
def test_a_response_head_ended_by_bare_lfs_is_a_502_at_once(answer: bytes) -> None:
    """
    Its head never ends in CRLF CRLF: without a look for a bare LF's blank
    line the client would wait for the idle timeout's 504.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, upstream = h.upstream()
    up.dataReceived(answer)
    answered(client, b"502 Bad Gateway", b"the upstream's response head lines do not end in CRLF")
    assert upstream.disconnecting


def test_a_response_head_that_never_ends_is_a_502_at_its_limit() -> None:
    """
    A vendor sending header lines without end is cut off once the head
    outgrows the limit, rather than held in memory until the idle timeout;
    the client hears why and the port serves on.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, upstream = h.upstream()
    up.dataReceived(b"HTTP/1.1 200 OK\r\n")
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    for _ in range(MAX_HEAD_SIZE // len(line) + 2):  # bounded: past the limit
        if upstream.disconnecting:
            break
        up.dataReceived(line)
    assert upstream.disconnecting
    answered(client, b"502 Bad Gateway", b"the upstream sent an oversized response head")
    proto, client = h.client()
    proto.dataReceived(GET)
    assert len(h.reactor.tcpClients) == 2


def test_malformed_request_is_400() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"this is not http\r\n\r\n")
    assert head_of(client.value())[0] == b"HTTP/1.1 400 Bad Request"
    assert client.disconnecting
    assert h.reactor.tcpClients == []


@pytest.mark.parametrize(
    "head",
    [
        b"GET http://example.com/ HTTP/1.1\nHost: example.com\n\n",
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\n\r\n",
    ],
)
def test_a_head_ended_by_bare_line_feeds_is_400_at_once(head: bytes) -> None:
    """
    A head whose lines end in LF alone (``nc``, a hand-written client) is
    refused as soon as its blank line comes, saying why, rather than
    waiting for a CRLF CRLF that will not come until the head timeout.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(head)
    answered(client, b"400 Bad Request", b"request head lines must end in CRLF")
    assert client.disconnecting
    assert h.reactor.tcpClients == []


def test_oversized_head_is_431() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"GET http://example.com/ HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD_SIZE)
    assert head_of(client.value())[0] == b"HTTP/1.1 431 Request Header Fields Too Large"


def test_request_line_over_the_head_limit_is_414() -> None:
    """
    A request line that alone outgrows the head limit is a URI too long, whether its
    end has come or not; a line that ends within the limit leaves the fault to the
    header fields.
    """
    h = Harness()
    for line in (
        b"GET http://example.com/?" + b"a" * MAX_HEAD_SIZE,
        b"GET http://example.com/?" + b"a" * MAX_HEAD_SIZE + b" HTTP/1.1\r\n\r\n",
    ):
        proto, client = h.client()
        proto.dataReceived(line)
        assert head_of(client.value())[0] == b"HTTP/1.1 414 URI Too Long"
        assert client.disconnecting
    proto, client = h.client()
    long_line = b"GET http://example.com/?" + b"a" * (MAX_HEAD_SIZE - 40) + b" HTTP/1.1\r\n"
    proto.dataReceived(long_line + b"X: " + b"a" * 100)
    assert head_of(client.value())[0] == b"HTTP/1.1 431 Request Header Fields Too Large"


def test_origin_form_is_400_with_hint() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:10201\r\n\r\n")
    answered(client, b"400 Bad Request", b"curl -x")


def test_smuggling_shapes_are_rejected() -> None:
    h = Harness()
    for bad in (
        b"POST http://e.com/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST http://e.com/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"POST http://e.com/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET http://e.com/ HTTP/1.1\r\nX: a\nY: b\r\n\r\n",
        b"GET http://e.com/ HTTP/1.1\r\nX : a\r\n\r\n",
    ):
        proto, client = h.client()
        proto.dataReceived(bad)
        assert head_of(client.value())[0] == b"HTTP/1.1 400 Bad Request", bad
    assert h.reactor.tcpClients == []


def test_connection_records() -> None:
    """
    A client connection is listed by its port and its session, with its
    client address, target and counters.
    """
    h = Harness()
    proto, _client = h.client()
    assert h.factory.connections == {proto.id: proto}
    proto.dataReceived(GET)
    up, upstream = h.upstream()
    up.dataReceived(OK)
    session = h.registry.current(PORT)
    assert session.connections == {proto}
    assert proto.client == "127.0.0.1:50000"
    assert proto.target == "example.com:80"
    assert proto.upstream is up
    assert up.address == "gw.example.com:10000"
    assert proto.bytes_down == len(OK)
    assert session.bytes_down == len(OK)
    assert proto.bytes_up == session.bytes_up == len(upstream.value())  # the head, as sent
    proto.connectionLost(Failure(ConnectionLost()))
    assert h.factory.connections == {}
    assert session.connections == set()


def test_session_close_aborts_its_connections() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    _up, upstream = h.upstream()
    session = h.registry.current(PORT)
    h.registry.close(session.id)
    assert session.ended is EndReason.CLOSED
    assert client.disconnected
    assert upstream.disconnected


def test_backpressure_pauses_upstream_when_client_is_slow() -> None:
    """
    When the client's transport is full, reading from the upstream stops;
    when it drains, reading resumes.  And the other way round.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, upstream = h.upstream()
    assert client.producer is up and upstream.producer is proto
    client.producer.pauseProducing()
    assert upstream.producerState == "paused"
    client.producer.resumeProducing()
    assert upstream.producerState == "producing"
    upstream.producer.pauseProducing()
    assert client.producerState == "paused"


def test_pipelined_backlog_is_bounded() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET + GET * 2000)
    assert client.producerState == "paused"
    up, _ = h.upstream()
    up.dataReceived(OK)
    # Still well over the limit: stays paused until the backlog drains.
    for _ in range(2000):
        up.dataReceived(OK)
    assert client.producerState == "producing"
    assert client.value().count(b"hello") == 2001


def test_writes_before_connect_are_buffered_then_flushed() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(
        b"PUT http://example.com/x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 200000\r\n\r\n"
    )
    proto.dataReceived(b"x" * 100000)
    assert client.producerState == "paused"
    _up, upstream = h.upstream()
    assert client.producerState == "producing"
    assert upstream.value().endswith(b"x" * 100000)


# ---------------------------------------------------------------- tunnels


def test_connect_handshake_and_splice() -> None:
    """
    CONNECT goes upstream as CONNECT with the session's credentials; the
    upstream's 200 is relayed and then bytes flow both ways untouched,
    including bytes the client sent before the tunnel was up.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nEARLY")
    up, upstream = h.upstream()
    first, lines, rest = head_of(upstream.value())
    assert first == b"CONNECT example.com:443 HTTP/1.1"
    assert header(lines, b"proxy-authorization") == [creds("sess0001")]
    assert rest == b""
    up.dataReceived(b"HTTP/1.1 200 Connection established\r\n\r\nSERVER-FIRST")
    assert client.value() == b"HTTP/1.1 200 Connection established\r\n\r\nSERVER-FIRST"
    assert upstream.value().endswith(b"\r\n\r\nEARLY")
    proto.dataReceived(b"\x16\x03\x01 client hello")
    assert upstream.value().endswith(b"EARLY\x16\x03\x01 client hello")
    up.dataReceived(b"\x16\x03\x03 server hello")
    assert client.value().endswith(b"\x16\x03\x03 server hello")
    assert proto.state == "tunnel"
    assert proto.session is not None and proto.session.bytes_down == len(
        b"SERVER-FIRST\x16\x03\x03 server hello"
    )


def test_connect_407_is_502() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    up, _ = h.upstream()
    up.dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    assert head_of(client.value())[0] == b"HTTP/1.1 502 Bad Gateway"


def test_connect_refused_by_upstream_relays_status() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"CONNECT example.com:25 HTTP/1.1\r\n\r\n")
    up, _ = h.upstream()
    up.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    first, _, body = head_of(client.value())
    assert first.startswith(b"HTTP/1.1 403")
    assert b"403 Forbidden" in body


class HalfCloseTransport(StringTransport):
    """
    A StringTransport that records a write shutdown.
    """

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def test_tunnel_half_close_both_directions() -> None:
    """
    A client FIN becomes a write shutdown toward the vendor while the vendor
    can still answer; the vendor's FIN then reaches the client as a write
    shutdown; each side closes once both of its halves are closed.
    """
    h = Harness()
    proto = h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    client = HalfCloseTransport()
    proto.makeConnection(client)
    proto.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    _, _, connector_factory, _, _ = h.reactor.tcpClients[-1]
    up = connector_factory.buildProtocol(None)
    upstream = HalfCloseTransport()
    up.makeConnection(upstream)
    up.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")

    proto.dataReceived(b"request")
    proto.readConnectionLost()
    assert upstream.write_closed and not client.write_closed
    assert not client.disconnecting
    up.dataReceived(b"answer after client FIN")
    assert client.value().endswith(b"answer after client FIN")
    up.writeConnectionLost()
    assert not upstream.disconnecting
    up.readConnectionLost()
    assert client.write_closed
    assert upstream.disconnecting
    proto.writeConnectionLost()
    assert client.disconnecting


def test_a_client_fin_before_the_tunnel_is_up_follows_its_bytes() -> None:
    """
    ``printf 'CONNECT ...\\r\\n\\r\\ndata' | nc -N``: the client's bytes and
    its FIN come before the vendor has answered.  Once it has, the bytes go
    through and then the FIN, and the vendor's answer still reaches the
    client.
    """
    h = Harness()
    proto = h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    client = HalfCloseTransport()
    proto.makeConnection(client)
    proto.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\nearly")
    proto.dataReceived(b" and more")
    proto.readConnectionLost()
    _, _, connector_factory, _, _ = h.reactor.tcpClients[-1]
    up = connector_factory.buildProtocol(None)
    upstream = HalfCloseTransport()
    up.makeConnection(upstream)
    assert not upstream.write_closed  # the CONNECT is still unanswered
    up.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    assert upstream.value().endswith(b"\r\n\r\nearly and more")
    assert upstream.write_closed
    up.dataReceived(b"answer")
    assert client.value() == b"HTTP/1.1 200 OK\r\n\r\nanswer"
    assert not client.disconnecting


POST_CUT = (
    b"POST http://example.com/form HTTP/1.1\r\nHost: example.com\r\nContent-Length: 100\r\n\r\n"
    + b"a" * 10
)


def test_a_discarded_body_that_ends_early_closes_the_connection() -> None:
    """
    A body proxymap reads only to discard it (its answer was local) and
    whose client then stops sending (FIN) before its length can never end:
    the connection closes after the answer, instead of waiting out the idle
    timeout in CLOSE-WAIT (and holding a graceful stop for its whole grace).
    """
    h = Harness(session_api={"enabled": True, "domain": "portmapper"})
    proto, client = h.client()
    proto.dataReceived(
        b"POST http://portmapper/session/ HTTP/1.1\r\nHost: portmapper\r\n"
        b"Content-Length: 100\r\n\r\n" + b"a" * 10
    )
    answered(client, b"405 Method Not Allowed", b"")
    assert not client.disconnecting  # the rest of the body may come
    proto.readConnectionLost()
    assert client.disconnecting


def test_a_forwarded_body_that_ends_early_is_a_400() -> None:
    """
    When the client's FIN cuts a body being forwarded before the vendor
    answered, the vendor would wait for the rest: the client gets a 400,
    and the upstream connection is closed, not kept.
    """
    h = Harness(pool=True)
    proto, client = h.client()
    proto.dataReceived(POST_CUT)
    _, upstream = h.upstream()
    assert upstream.value().endswith(b"\r\n\r\n" + b"a" * 10)
    proto.readConnectionLost()
    answered(client, b"400 Bad Request", b"the request body ended before its declared length")
    assert client.disconnecting
    assert upstream.disconnecting
    assert h.tally.pool is not None and len(h.tally.pool) == 0


def test_a_body_that_ends_early_lets_a_started_response_finish() -> None:
    """
    If the vendor is already answering (an early response), the client's
    FIN lets the response finish, then the connection closes.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(POST_CUT)
    up, _ = h.upstream()
    up.dataReceived(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 5\r\n\r\nto")
    proto.readConnectionLost()
    assert not client.disconnecting
    up.dataReceived(b"o b")
    first, _, body = head_of(client.value())
    assert (first, body) == (b"HTTP/1.1 413 Content Too Large", b"too b")
    assert client.disconnecting


def test_pipelined_requests_before_a_fin_are_all_answered() -> None:
    """
    A client that pipelines requests and then sends its FIN (``printf ... |
    nc -N``) gets every whole request answered, forwarded and local alike,
    in order; then the connection closes, a cut head left unanswered.
    """
    h = Harness(pool=True, session_api={"enabled": True, "domain": "portmapper"})
    proto, client = h.client()
    api = b"GET http://portmapper/session/ HTTP/1.1\r\nHost: portmapper\r\n\r\n"
    proto.dataReceived(GET + api + GET + b"GET http://exa")
    up, upstream = h.upstream()
    proto.readConnectionLost()
    assert not client.disconnecting
    up.dataReceived(OK)
    assert not client.disconnecting  # the second GET went up
    assert upstream.value().count(b"GET http://example.com/page?q=1") == 2
    up.dataReceived(OK)
    assert client.value().count(b"HTTP/1.1 200 OK") == 3
    assert client.value().count(b"hello") == 2
    assert client.disconnecting
    assert not upstream.disconnecting  # idle again: kept for the session
    assert h.tally.pool is not None and len(h.tally.pool) == 1


CHUNKED_BAD = (
    b"POST http://example.com/form HTTP/1.1\r\nHost: example.com\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def test_a_malformed_chunked_body_is_a_400_before_the_answer() -> None:
    """
    A request body whose chunk framing is broken, found before the vendor
    began to answer: the client gets a 400 saying so (not a reset), and
    the upstream connection, which got part of the body, is closed.
    """
    h = Harness(pool=True)
    proto, client = h.client()
    proto.dataReceived(CHUNKED_BAD + b"5\r\nhello\r\n")
    _, upstream = h.upstream()
    proto.dataReceived(b"zz\r\nabc\r\n0\r\n\r\n")
    answered(client, b"400 Bad Request", b"invalid chunk size")
    assert client.disconnecting and not client.disconnected  # closed, not reset
    assert upstream.disconnecting
    assert h.tally.pool is not None and len(h.tally.pool) == 0


def test_a_malformed_chunked_body_after_the_answer_began_resets() -> None:
    """
    Once the vendor's answer is under way, no 400 can be told: the
    connection is reset, so the client sees the answer incomplete.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(CHUNKED_BAD + b"5\r\nhello\r\n")
    up, upstream = h.upstream()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhal")
    proto.dataReceived(b"zz\r\n")
    assert client.disconnected and upstream.disconnected


def test_a_malformed_chunked_answer_is_cut_and_read_no_further() -> None:
    """
    The vendor's chunk framing breaks mid-answer: both connections are
    reset, the client sees the answer incomplete, and whatever the vendor
    still sends is not read as more of it.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, upstream = h.upstream()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    sent = client.value()
    with capturedLogs() as events:
        up.dataReceived(b"zz\r\n")
    assert client.disconnected and upstream.disconnected
    assert [formatEvent(e) for e in events] == [
        f"upstream {UPSTREAM_HOST}:{UPSTREAM_PORT} sent a malformed body"
    ]
    up.dataReceived(b"3\r\nxyz\r\n0\r\n\r\n")
    assert client.value() == sent


def test_a_malformed_discarded_body_closes_after_the_local_answer() -> None:
    """
    A body read only to be discarded (the Session API answered) that turns
    out malformed: the connection closes; no second answer is written.
    """
    h = Harness(session_api={"enabled": True, "domain": "portmapper"})
    proto, client = h.client()
    proto.dataReceived(
        b"POST http://portmapper/session/ HTTP/1.1\r\nHost: portmapper\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
    )
    assert client.value().count(b"HTTP/1.1 ") == 1
    answered(client, b"405 Method Not Allowed", b"")
    assert client.disconnecting and not client.disconnected


def test_a_nul_in_the_vendors_response_head_is_a_502() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, _ = h.upstream()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n")
    first, _, _ = head_of(client.value())
    assert first == b"HTTP/1.1 502 Bad Gateway"
    assert b"\x00" not in client.value()


def test_tunnel_abort_closes_both_sides() -> None:
    """
    Over iosim: when the vendor's side of a tunnel is aborted, the client's
    side closes too and the port forgets the connection.
    """
    from twisted.internet.protocol import Protocol

    h = Harness()
    client = Protocol()
    server = h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    pump1 = iosim.connect(
        server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=False
    )
    client.transport.write(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    pump1.flush()
    up = h.reactor.tcpClients[-1][2].buildProtocol(None)
    vendor = Protocol()
    pump2 = iosim.connect(
        vendor, iosim.makeFakeServer(vendor), up, iosim.makeFakeClient(up), greet=False
    )
    vendor.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    pump2.flush()
    pump1.flush()
    assert server.state == "tunnel"

    vendor.transport.abortConnection()
    for _ in range(3):
        pump2.flush()
        pump1.flush()
    assert server._gone
    assert client.transport.disconnected
    assert h.factory.connections == {}
