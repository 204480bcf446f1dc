"""
proxymap and an independent HTTP/1.1 implementation agree on where every
message ends: h11 (python-hyper's sans-I/O parser) reads what proxymap sends
on each side, as a vendor's gateway and a client would.

A proxy that reads framing one way while the next hop reads it another is
open to request smuggling (toward the vendor) and response desync (toward
its clients).  These properties drive arbitrary messages through a mapped
port in memory -- framing fields repeated, conflicting, oddly cased or
spaced, chunk extensions and trailers, bytes after the message, any cutting
into reads -- and check what comes out with h11:

- toward the vendor: at most one request, well framed and, when h11 takes
  the client's request as it came, with the same method, target and body;
- toward the client: one answer, well framed, never followed by anything
  and, when h11 takes the vendor's answer as it came, with the same status
  and body.

Where h11 refuses the message as it came for a reason it gives again for
what proxymap forwarded (it supports no transfer coding but chunked), it
cannot judge, and no comparison is made.  Where proxymap is stricter than h11
on purpose, the difference is named (``STRICTER``).
"""

from __future__ import annotations

import attrs
import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from .helpers import FUZZ_EXAMPLES, Harness, cut

#: What proxymap refuses though h11 takes it, on purpose.
STRICTER = (
    # RFC 9112 6.1 lets a server either refuse such a request or read it
    # as chunked; proxymap refuses: the vendor might read it the other way.
    b"400 Bad Request: both Transfer-Encoding and Content-Length",
)


NEXT = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"


@attrs.frozen
class Reading:
    """
    What h11 made of one side's bytes: the first message, whether it ended,
    what came after it, and the error that stopped h11, if one did.
    """

    start: tuple[bytes, ...] | None
    body: bytes
    complete: bool
    trailing: bytes
    error: str | None


def read(connection: h11.Connection, data: bytes, eof: bool) -> Reading:
    connection.receive_data(data)
    if eof:
        connection.receive_data(b"")
    start: tuple[bytes, ...] | None = None
    body = b""
    complete = False
    error = None
    try:
        while not complete:
            event = connection.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                start = (event.method, event.target)
            elif isinstance(event, h11.Response):
                start = (b"%d" % event.status_code,)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                complete = True
            elif isinstance(event, h11.ConnectionClosed):
                break
    except h11.RemoteProtocolError as e:
        error = str(e)
    return Reading(start, body, complete, connection.trailing_data[0], error)


def read_request(data: bytes) -> Reading:
    return read(h11.Connection(h11.SERVER), data, eof=False)


def read_response(method: bytes, data: bytes, eof: bool) -> Reading:
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method=method, target="/", headers=[("Host", "example.com")]))
    connection.send(h11.EndOfMessage())
    return read(connection, data, eof)


def framing_fields(n: int, extra: list[bytes]) -> st.SearchStrategy[list[bytes]]:
    """
    Header fields around a body of ``n`` bytes: the usual and the odd ways
    of framing it, some of them conflicting, and fields that do not frame.
    """
    return st.lists(
        st.sampled_from(
            [
                b"Content-Length: %d" % n,
                b"Content-Length: %d" % (n + 1),
                b"Content-Length: %d, %d" % (n, n),
                b"Content-Length:  %d " % n,
                b"Content-Length: +%d" % n,
                b"Transfer-Encoding: chunked",
                b"Transfer-Encoding: Chunked",
                b"Transfer-Encoding: gzip, chunked",
                b"Transfer-Encoding: chunked, gzip",
                b"Transfer-Encoding: identity",
                b"Transfer-Encoding:",
                b"Connection: close",
                b"Connection: keep-alive",
                b"X-A: b",
                *extra,
            ]
        ),
        max_size=5,
    )


@st.composite
def bodies(draw: st.DrawFn, data: bytes) -> bytes:
    """
    ``data`` as it came, or chunked in one of several ways, some malformed.
    """
    kind = draw(st.sampled_from(["raw", "chunked", "ext", "upper", "trailer", "space", "short"]))
    if kind == "raw":
        return data
    size = b"%x" % len(data)
    size = {"upper": size.upper(), "ext": size + b";a=b", "space": b" " + size}.get(kind, size)
    if kind == "short":
        data = data[:-1]
    chunks = size + b"\r\n" + data + b"\r\n" if data else b""
    return chunks + b"0\r\n" + (b"X-T: 1\r\n" if kind == "trailer" else b"") + b"\r\n"


@st.composite
def messages(
    draw: st.DrawFn, first_lines: list[bytes], fields: list[bytes], after: list[bytes]
) -> bytes:
    data = draw(st.binary(max_size=12))
    lines = [draw(st.sampled_from(first_lines)), *draw(framing_fields(len(data), fields))]
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    return head + draw(bodies(data)) + draw(st.sampled_from([b"", *after]))


vendor_answers = messages(
    [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200",
        b"HTTP/1.0 200 OK",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.1 304 Not Modified",
        b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK",
    ],
    [b"Content-Type: text/plain"],
    [b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON", b"xyz"],
)

client_requests = messages(
    [
        b"GET http://e.com/a HTTP/1.1",
        b"POST http://e.com/a HTTP/1.1",
        b"PUT http://e.com/x?y=1 HTTP/1.1",
        b"POST http://e.com/ HTTP/1.0",
    ],
    [
        b"Host: e.com",
        b"Host: e.com",
        b"Expect: 100-continue",
        b"Proxy-Connection: keep-alive",
        b"TE: trailers",
    ],
    [b"GET http://e.com/smuggled HTTP/1.1\r\nHost: e.com\r\n\r\n", b"xyz"],
)

fuzz = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@fuzz
@given(vendor_answers, st.sampled_from([b"GET", b"HEAD"]), st.booleans(), st.data())
def test_a_client_gets_one_well_framed_answer(
    answer: bytes, method: bytes, vendor_closes: bool, data: st.DataObject
) -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"%s http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n" % method)
    up, upstream = h.upstream()
    for piece in cut(answer, data.draw(st.lists(st.integers(0, len(answer)), max_size=3))):
        if not upstream.disconnecting:  # a transport that is closing reads no more
            up.dataReceived(piece)
    if vendor_closes and not upstream.disconnecting:
        up.connectionLost(Failure(ConnectionDone()))
    out = client.value()

    as_sent = read_response(method, answer, eof=vendor_closes)
    so_far = read_response(method, out, eof=False)
    assert so_far.error is None or so_far.error == as_sent.error, out
    got = read_response(method, out, eof=client.disconnecting)
    # An answer cut short is allowed (the client sees it incomplete), but
    # nothing may follow a whole one.
    assert not got.complete or got.trailing == b"", out
    if as_sent.complete and as_sent.error is None:
        assert (got.start, got.body) == (as_sent.start, as_sent.body), out
    if got.complete and not client.disconnecting:
        # The connection goes on: the next request gets its own answer,
        # nothing the vendor sent before it.
        proto.dataReceived(b"GET http://example.com/next HTTP/1.1\r\nHost: example.com\r\n\r\n")
        carriers = len(h.reactor.tcpClients)
        carrier = up if carriers == 1 else h.upstream(carriers - 1)[0]
        carrier.dataReceived(NEXT)
        assert client.value()[len(out) :] == NEXT


@fuzz
@given(client_requests, st.data())
def test_the_vendor_gets_at_most_one_well_framed_request(
    request: bytes, data: st.DataObject
) -> None:
    h = Harness()
    proto, client = h.client()
    for piece in cut(request, data.draw(st.lists(st.integers(0, len(request)), max_size=3))):
        if not client.disconnecting:
            proto.dataReceived(piece)
    answer = client.value()

    as_sent = read_request(request)
    if not h.reactor.tcpClients:
        if as_sent.complete and as_sent.error is None:
            # proxymap refused what h11 took: only where it is stricter on purpose.
            assert answer.split(b"\r\n\r\n")[1].startswith(STRICTER), answer
        return
    _, upstream = h.upstream()
    forwarded = upstream.value()
    got = read_request(forwarded)
    if got.error is not None and got.error != as_sent.error:
        # A body is streamed as it comes: proxymap found it malformed after
        # sending its start, answered 400 and closed the vendor's connection.
        assert answer.startswith(b"HTTP/1.1 400 "), (forwarded, answer)
        assert upstream.disconnecting
        return
    assert not got.complete or got.trailing == b"", forwarded
    if as_sent.complete and as_sent.error is None and got.start is not None:
        assert (got.start, got.body) == (as_sent.start, as_sent.body), forwarded
        assert got.complete
