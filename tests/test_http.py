"""
HTTP head parsing and body framing, and fuzzing of a live port.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxymap.dataplane.http import (
    ChunkedFramer,
    HTTPError,
    LengthFramer,
    build_head,
    parse_request_head,
    parse_response_head,
)

from .helpers import FUZZ_EXAMPLES, Harness, head_of


def test_absolute_form() -> None:
    r = parse_request_head(b"GET http://Example.com:8080/a?b#c HTTP/1.1\r\nHost: x")
    assert (r.host, r.port, r.path) == ("Example.com", 8080, b"/a?b#c")
    assert r.keep_alive and not r.has_body


def test_ipv6_and_userinfo() -> None:
    r = parse_request_head(b"GET http://user:pw@[::1]:81 HTTP/1.1")
    assert (r.host, r.port, r.path) == ("::1", 81, b"/")
    r = parse_request_head(b"CONNECT [2001:db8::1]:443 HTTP/1.1")
    assert (r.host, r.port, r.authority) == ("2001:db8::1", 443, "[2001:db8::1]:443")


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/2.0", 505),
        (b"GET / HTTX/1.1", 400),
        (b"G@T / HTTP/1.1", 400),
        (b"GET  / HTTP/1.1", 400),
        (b"CONNECT example.com HTTP/1.1", 400),
        (b"GET ftp://x/ HTTP/1.1", 400),
        (b"GET http://x:99999/ HTTP/1.1", 400),
        (b"GET http://x/ HTTP/1.1\r\nHost: a\r\nHost: b", 400),
        (b"GET http://x/ HTTP/1.1\r\n folded", 400),
        (b"GET http://x/ HTTP/1.1\r\nContent-Length: -1", 400),
        (b"GET http://x/ HTTP/1.1" + b"\r\nA: b" * 200, 431),
    ],
)
def test_request_errors(head: bytes, status: int) -> None:
    with pytest.raises(HTTPError) as e:
        parse_request_head(head)
    assert e.value.status == status


def test_response_framing() -> None:
    r = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3", b"GET")
    assert r.content_length == 3 and r.keep_alive
    r = parse_response_head(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3", b"GET"
    )
    assert r.chunked and r.content_length is None
    assert not any(line.lower().startswith(b"content-length") for line in r.lines)
    r = parse_response_head(b"HTTP/1.0 200 OK", b"GET")
    assert r.until_close and not r.keep_alive
    r = parse_response_head(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9", b"GET")
    assert r.content_length == 0
    with pytest.raises(HTTPError):
        parse_response_head(b"ICY 200 OK", b"GET")


def test_length_framer() -> None:
    f = LengthFramer(5)
    assert f.feed(b"abc") == 3 and not f.done
    assert f.feed(b"defg") == 2 and f.done


def test_chunked_framer_stops_at_end() -> None:
    body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\n"
    f = ChunkedFramer(decode=True)
    assert f.feed(body + b"NEXT") == len(body)
    assert f.done and b"".join(f.decoded) == b"Wikipedia"


@given(st.lists(st.binary(min_size=1, max_size=50), max_size=10), st.data())
def test_chunked_framer_any_split(chunks: list[bytes], data: st.DataObject) -> None:
    """
    However the encoded body is cut into reads, the framer finds the same end
    and the same data.
    """
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    cuts = sorted(data.draw(st.sets(st.integers(0, len(encoded)), max_size=8)))
    f = ChunkedFramer(decode=True)
    consumed = 0
    pieces = [encoded[a:b] for a, b in zip([0, *cuts], [*cuts, len(encoded)], strict=True)]
    for piece in pieces:
        consumed += f.feed(piece)
    assert f.done and consumed == len(encoded)
    assert b"".join(f.decoded) == b"".join(chunks)


@settings(max_examples=FUZZ_EXAMPLES)
@given(st.binary(max_size=300))
def test_chunked_framer_garbage(data: bytes) -> None:
    f = ChunkedFramer()
    try:
        n = f.feed(data)
    except HTTPError as e:
        assert e.status == 400
    else:
        assert 0 <= n <= len(data)


@settings(max_examples=FUZZ_EXAMPLES)
@given(st.binary(max_size=400))
def test_request_parser_never_crashes(head: bytes) -> None:
    try:
        parse_request_head(head)
    except HTTPError as e:
        assert e.status in (400, 431, 505)


request_like = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda m, t, v, h: m + b" " + t + b" " + v + b"\r\n" + h + b"\r\n\r\n",
        st.sampled_from([b"GET", b"POST", b"CONNECT", b"G T", b""]),
        st.sampled_from([b"http://e.com/", b"/", b"e.com:443", b"http://[::1", b"*"]),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"x"]),
        st.binary(max_size=120),
    ),
)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.lists(request_like, min_size=1, max_size=4))
def test_port_survives_arbitrary_input(reads: list[bytes]) -> None:
    """
    Whatever arrives on a mapped port gets a proper answer or a close, never
    an exception, and a valid request on a new connection still works.
    """
    h = Harness()
    proto, client = h.client()
    for data in reads:
        proto.dataReceived(data)
    out = client.value()
    if out and reads[0][:1] not in (b"\x04", b"\x05"):  # those speak SOCKS
        assert out.startswith(b"HTTP/1.1 ")
    for index in range(len(h.reactor.tcpClients)):
        up, _ = h.upstream(index)
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    proto2, client2 = h.client()
    proto2.dataReceived(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    up, _ = h.upstream()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert head_of(client2.value())[2] == b"ok"


# Header lines as clients and vendors send them, hop-by-hop ones included, so
# that some heads can be forwarded verbatim and some must be rebuilt.
_field_names = st.sampled_from(
    [
        b"Host",
        b"Accept",
        b"User-Agent",
        b"Cookie",
        b"Content-Type",
        b"X-Trace",
        b"Connection",
        b"Proxy-Connection",
        b"Keep-Alive",
        b"Proxy-Authorization",
        b"TE",
        b"Upgrade",
        b"Via",
        b"Server",
        b"Date",
        b"x-lower",
    ]
)
_field_values = st.sampled_from(
    [b"a", b"keep-alive", b"close", b"X-Trace", b"Basic YTpi", b"text/html; q=1", b""]
)
_fields = st.lists(
    st.tuples(_field_names, _field_values).map(lambda f: f[0] + b": " + f[1]), max_size=8
)


@given(_fields, st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
@settings(max_examples=FUZZ_EXAMPLES)
def test_verbatim_request_fields_equal_the_rebuild(fields: list[bytes], version: bytes) -> None:
    """
    Where a request's header block is forwarded as it came, it is exactly
    the head a rebuild from the kept lines would give.
    """
    head = b"\r\n".join([b"GET http://example.com/x " + version, *fields])
    try:
        request = parse_request_head(head)
    except HTTPError:
        return
    dropped = any(
        f.split(b":")[0].lower()
        in (
            b"connection",
            b"proxy-connection",
            b"keep-alive",
            b"proxy-authorization",
            b"te",
            b"upgrade",
        )
        for f in fields
    )
    assert (request.verbatim is None) == dropped
    if request.verbatim is not None:
        extra = [b"Proxy-Authorization: Basic c2Vzcw=="]
        line = b"GET http://example.com/x HTTP/1.1"
        assert line + request.verbatim + b"\r\n" + extra[0] + b"\r\n\r\n" == build_head(
            line, request.lines, extra
        )


@given(
    _fields,
    st.sampled_from(
        [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.0 200 OK", b"HTTP/1.1 200"]
    ),
    st.sampled_from([b"Content-Length: 5", b"Transfer-Encoding: chunked", b""]),
)
@settings(max_examples=FUZZ_EXAMPLES)
def test_verbatim_response_equals_the_rebuild(
    fields: list[bytes], status_line: bytes, framing: bytes
) -> None:
    """
    Where a response head is forwarded as it came, it is exactly the head a
    rebuild would give; heads that lose a field are always rebuilt.
    """
    head = b"\r\n".join([status_line, *fields, *([framing] if framing else [])])
    try:
        response = parse_response_head(head, b"GET")
    except HTTPError:
        return
    rebuilt = build_head(b"HTTP/1.1 %d %s" % (response.status, response.reason), response.lines)
    if response.verbatim is not None:
        assert response.verbatim + b"\r\n\r\n" == rebuilt
    else:
        assert (
            len(response.lines) < len(fields) + bool(framing)
            or not status_line.startswith(b"HTTP/1.1 ")
            or status_line.count(b" ") < 2
        )
