"""
HTTP head parsing and body framing, and fuzzing of a live port.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxymap.dataplane import http
from proxymap.dataplane.http import (
    ChunkedFramer,
    HTTPError,
    LengthFramer,
    build_head,
    parse_request_head,
    parse_response_head,
)

from .helpers import FUZZ_EXAMPLES, Harness, cut, head_of


def test_absolute_form() -> None:
    r = parse_request_head(b"GET http://Example.com:8080/a?b#c HTTP/1.1\r\nHost: x")
    assert (r.host, r.port, r.path) == ("Example.com", 8080, b"/a?b#c")
    assert r.keep_alive and not r.has_body


@pytest.mark.parametrize(
    ("head", "target"),
    [
        (b"GET ws://example.com:81/chat HTTP/1.1", b"http://example.com:81/chat"),
        (b"GET WS://example.com/ HTTP/1.1\r\nTE: trailers", b"http://example.com/"),
        (b"GET Http://example.com/ HTTP/1.1", b"Http://example.com/"),
    ],
)
def test_a_ws_target_goes_on_as_http(head: bytes, target: bytes) -> None:
    """
    A ``ws://`` target (aiohttp asks a proxy for a plain WebSocket so) is
    forwarded as the ``http://`` target it stands for; others as they came.
    """
    r = parse_request_head(head)
    assert r.target == target
    assert (r.host, r.path) == ("example.com", b"/chat" if b"chat" in head else b"/")
    assert r.port == (81 if b":81" in head else 80)


@pytest.mark.parametrize(
    ("fields", "upgrade"),
    [
        (b"Upgrade: websocket\r\nConnection: Upgrade", b"websocket"),
        (b"Connection: keep-alive, upgrade\r\nUpgrade: a/1\r\nupgrade: b", b"a/1, b"),
        # Not asked for properly: Connection does not name it, or nothing to switch to.
        (b"Upgrade: websocket", None),
        (b"Upgrade: websocket\r\nConnection: keep-alive", None),
        (b"Upgrade:\r\nConnection: Upgrade", None),
        (b"Connection: Upgrade", None),
        # A switch the proxy could not follow: one after a body.
        (b"Upgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 3", None),
        (b"Upgrade: websocket\r\nConnection: Upgrade\r\nTransfer-Encoding: chunked", None),
    ],
)
def test_an_upgrade_is_forwarded_only_when_properly_asked(
    fields: bytes, upgrade: bytes | None
) -> None:
    r = parse_request_head(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n" + fields)
    assert r.upgrade == upgrade
    # Either way the fields stay off the lines forwarded as they came.
    names = {line.partition(b":")[0].lower() for line in r.lines}
    assert not names & {b"upgrade", b"connection"}


def test_an_http_1_0_upgrade_is_ignored() -> None:
    """
    RFC 9110 7.8: a server ignores an Upgrade received in an HTTP/1.0 request.
    """
    r = parse_request_head(
        b"GET http://example.com/ HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade"
    )
    assert r.upgrade is None


def test_a_101_names_its_protocol() -> None:
    r = parse_response_head(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: x",
        b"GET",
    )
    assert (r.status, r.upgrade) == (101, b"websocket")
    assert r.lines == [b"Sec-WebSocket-Accept: x"]
    assert r.content_length == 0


@pytest.mark.parametrize(
    ("head", "host"),
    [
        (b"GET http://example.com/ HTTP/1.1\r\nHost: other.example", b"example.com"),
        (
            b"GET http://u:p@example.com:8080/ HTTP/1.1\r\nHost: example.com\r\nConnection: close",
            b"example.com:8080",
        ),
        # A field only the general parser takes (TE) beside it.
        (b"GET http://example.com/ HTTP/1.1\r\nTE: trailers\r\nhost: other", b"example.com"),
        (b"GET http://example.com/ HTTP/1.1\r\nHost:", b"example.com"),
    ],
)
def test_a_host_field_naming_another_host_is_replaced(head: bytes, host: bytes) -> None:
    """
    A proxy ignores the Host of an absolute-form request and sends the
    target's instead (RFC 9112 3.2.2): the vendor, and through a SOCKS5
    upstream the origin itself, must not see a host the target does not name.
    """
    r = parse_request_head(head)
    assert not r.has_host_header and r.verbatim is None
    assert [line for line in r.lines if line.lower().startswith(b"host:")] == []
    assert r.host_header == host


@pytest.mark.parametrize(
    "head",
    [
        b"GET http://example.com/ HTTP/1.1\r\nHost: EXAMPLE.com",
        b"GET http://example.com:8080/ HTTP/1.1\r\nTE: trailers\r\nHost: example.com:8080",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: other.example",  # its target is all
    ],
)
def test_a_host_field_naming_the_target_is_kept(head: bytes) -> None:
    r = parse_request_head(head)
    assert r.has_host_header
    assert [line for line in r.lines if line.lower().startswith(b"host:")] != []


def test_the_host_made_for_a_request_without_one_is_the_target_as_written() -> None:
    """
    An HTTP/1.0 request without Host gets the target's authority, bytes as
    the client wrote them: no IDNA round trip, which refused a label over
    63 characters and took the connection down with it.
    """
    label = b"a" * 64
    r = parse_request_head(b"GET http://" + label + b".example/x HTTP/1.0")
    assert not r.has_host_header and r.host_header == label + b".example"
    r = parse_request_head(b"GET http://[::1]:81/ HTTP/1.0")
    assert r.host_header == b"[::1]:81"


def test_ipv6_and_userinfo() -> None:
    r = parse_request_head(b"GET http://user:pw@[::1]:81 HTTP/1.1")
    assert (r.host, r.port, r.path) == ("::1", 81, b"/")
    r = parse_request_head(b"CONNECT [2001:db8::1]:443 HTTP/1.1")
    assert (r.host, r.port, r.host_header) == ("2001:db8::1", 443, b"[2001:db8::1]:443")


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
        (b"GET http://ex\xe4mple.com/ HTTP/1.1", 400),  # a URI's host is ASCII
        (b"CONNECT ex\xe4mple.com:443 HTTP/1.1", 400),
        (b"POST http://x/ HTTP/1.1\r\nContent-Length: 5, 6", 400),  # RFC 9110 8.6
        (b"GET  HTTP/1.1", 400),
        (b"GET http://x/ HTTP/1.1\r\nHost x", 400),
    ],
)
def test_request_errors(head: bytes, status: int) -> None:
    with pytest.raises(HTTPError) as e:
        parse_request_head(head)
    assert e.value.status == status


@pytest.mark.parametrize(
    "head",
    [
        b"GET http://x/ HTTP/1.1\r\nHost: x\r\nX-A: a\x00b",
        b"GET http://x/\x00 HTTP/1.1\r\nHost: x",
        b"POST http://x/ HTTP/1.1\r\nContent-Length: 1\x00",
    ],
)
def test_a_nul_in_a_request_head_is_refused(head: bytes) -> None:
    """
    RFC 9110, 5.5: a NUL in a field must be refused or replaced; forwarded
    verbatim it could end the field early at the next hop.  The fast path
    leaves such heads to the general one, which refuses them.
    """
    assert http._parse_request_fast(head, 128) is None
    with pytest.raises(HTTPError) as e:
        parse_request_head(head)
    assert (e.value.status, e.value.message) == (400, "NUL in the message head")


@pytest.mark.parametrize(
    "head", [b"HTTP/1.1 200 OK\r\nX-A: a\x00b", b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0"]
)
def test_a_nul_in_a_response_head_is_refused(head: bytes) -> None:
    assert http._parse_response_fast(head, b"GET") is None
    with pytest.raises(HTTPError) as e:
        parse_response_head(head, b"GET")
    assert e.value.status == 502


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-A: a\rb",
        b"HTTP/1.1 200 OK\r\nX-A: a\nb",
        b"HTTP/1.1 200 OK" + b"\r\nA: b" * 200,
    ],
    ids=["bare-cr", "bare-lf", "too-many-fields"],
)
def test_a_bad_response_head_is_the_vendors_fault(head: bytes) -> None:
    """
    Whatever is wrong with a response head, the client is told 502 (the
    vendor's fault), never the 400 or 431 a request head would get.
    """
    with pytest.raises(HTTPError) as e:
        parse_response_head(head, b"GET")
    assert e.value.status == 502
    assert e.value.message.startswith("the upstream sent a malformed response head")


@pytest.mark.parametrize("line", [b"No colon here", b": no name", b"Content-Length : 5", b" X: a"])
def test_a_response_field_without_a_name_is_the_vendors_fault(line: bytes) -> None:
    """
    A response field line with no name, or whitespace around its name
    (RFC 9112 5.1: a 502, not something to guess at), fails the response.
    """
    with pytest.raises(HTTPError) as e:
        parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + line, b"GET")
    assert (e.value.status, e.value.message) == (502, "the upstream sent a malformed header field")


@pytest.mark.parametrize(
    "name",
    [
        b"Transfer Encoding",  # a space inside
        b"Content-Length\x0b",  # a vertical tab, which some servers strip
        b"X(a)",
        b"X\x7f",
        b"X\xc3\xa9",
        b"",
    ],
)
def test_a_request_field_name_that_is_not_a_token_is_refused(name: bytes) -> None:
    """
    RFC 9110 5.1: a field name is a token.  Forwarded as it came, another
    name could be read by the next hop as a framing field this proxy never
    saw ("Transfer Encoding" as Transfer-Encoding): a 400 instead.
    """
    head = b"POST http://x/ HTTP/1.1\r\nHost: x\r\n" + name + b": chunked\r\nContent-Length: 5"
    with pytest.raises(HTTPError) as e:
        parse_request_head(head)
    assert (e.value.status, e.value.message) == (400, "malformed header field")


def test_every_token_character_may_name_a_request_field() -> None:
    name = b"!#$%&'*+-.^_`|~09AZaz"
    r = parse_request_head(b"GET http://x/ HTTP/1.1\r\nHost: x\r\n" + name + b": v")
    assert r.lines == [b"Host: x", name + b": v"]


@pytest.mark.parametrize(
    "fields",
    [
        [b"Content-Length: 5", b"Content-Length: 5"],
        [b"Content-Length: 5, 5"],
        [b"Content-Length: 5 ,5", b"content-length: 5"],
    ],
)
def test_a_repeated_content_length_goes_on_as_one(fields: list[bytes]) -> None:
    """
    RFC 9110 8.6: a recipient accepting a Content-Length repeated with one
    value must make it one field before forwarding.
    """
    r = parse_request_head(
        b"\r\n".join([b"POST http://x/ HTTP/1.1", b"Host: x", *fields, b"Accept: a"])
    )
    assert r.content_length == 5
    assert r.verbatim is None
    assert r.lines == [b"Host: x", b"Accept: a", b"Content-Length: 5"]
    response = parse_response_head(b"\r\n".join([b"HTTP/1.1 200 OK", *fields, b"ETag: e"]), b"GET")
    assert response.content_length == 5
    assert response.verbatim is None
    assert response.lines == [b"ETag: e", b"Content-Length: 5"]


def test_an_http_1_0_request_with_transfer_encoding_closes_after() -> None:
    """
    RFC 9112 6.1: HTTP/1.0 has no Transfer-Encoding, so such a message's
    framing is faulty: it is read as chunked and its connection closes after.
    """
    r = parse_request_head(
        b"POST http://x/ HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked"
    )
    assert r.chunked
    assert not r.keep_alive


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked",
    ],
)
def test_a_response_framed_two_ways_ends_its_connection(head: bytes) -> None:
    """
    A response with both Content-Length and Transfer-Encoding, or an
    HTTP/1.0 one with Transfer-Encoding, is read as chunked and forwarded
    without the Content-Length (RFC 9112 6.3); a hop before us may have read
    it the other way, so its connection carries no other request.
    """
    r = parse_response_head(head, b"GET")
    assert r.chunked and r.content_length is None
    assert [line for line in r.lines if line.lower().startswith(b"content-length")] == []
    assert not r.keep_alive


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


@pytest.mark.parametrize(
    "body",
    [
        b"5;a=\rb\r\nhello\r\n0\r\n\r\n",  # in an extension
        b"5\r\nhello\r\n0\r\nX: a\rb\r\n\r\n",  # in a trailer
        b"5;\x00\r\nhello\r\n0\r\n\r\n",
    ],
)
def test_a_bare_cr_or_nul_in_a_chunk_line_is_refused(body: bytes) -> None:
    """
    Chunk lines are relayed as they came; a next hop reading a bare CR as a
    line's end would find the chunk data elsewhere (RFC 9112 2.2).
    """
    f = ChunkedFramer()
    with pytest.raises(HTTPError) as e:
        f.feed(body)
    assert (e.value.status, e.value.message) == (400, "bare CR or NUL in a chunk line")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"5" * 5000, "chunk line too long"),
        (b"5\nhello\r\n0\r\n\r\n", "chunk line not terminated by CRLF"),
        (b"5\r\nhello!\r\n0\r\n\r\n", "chunk data longer than its size"),
        (b"x\r\n", "invalid chunk size"),
    ],
)
def test_broken_chunk_framing_is_refused(body: bytes, message: str) -> None:
    """
    Framing that cannot be followed is refused with what is wrong: relayed,
    the next hop could read the message's end somewhere else than here.
    """
    with pytest.raises(HTTPError) as e:
        ChunkedFramer().feed(body)
    assert (e.value.status, e.value.message) == (400, message)


@pytest.mark.parametrize(
    ("size_line", "valid"),
    [
        (b"5", True),
        (b"5 ", True),
        (b"5 ;a=b", True),
        (b"5\t;a", True),
        (b" 5", False),
        (b"\t5", False),
    ],
)
def test_whitespace_in_a_chunk_size_line(size_line: bytes, valid: bool) -> None:
    """
    RFC 9112 7.1: whitespace may come before an extension's ";" (and after
    the size, as h11 takes it), never before the size.
    """
    f = ChunkedFramer()
    body = size_line + b"\r\nhello\r\n0\r\n\r\n"
    if valid:
        assert f.feed(body) == len(body) and f.done
    else:
        with pytest.raises(HTTPError, match="invalid chunk size"):
            f.feed(body)


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
    for piece in cut(encoded, cuts):
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
    [
        b"a",
        b"keep-alive",
        b"close",
        b"X-Trace",
        b"Basic YTpi",
        b"text/html; q=1",
        b"",
        b"example.com",
        b"Example.COM",
    ]
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
    ) or any(  # a Host naming another host than the target is replaced
        f.split(b":")[0].lower() == b"host" and f.split(b":")[1].strip().lower() != b"example.com"
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


# -- the fast paths answer exactly as the general parsers do -----------------

_plain_names = st.sampled_from(
    [
        b"Host",
        b"HOST",
        b"Accept",
        b"Content-Length",
        b"content-length",
        b"Transfer-Encoding",
        b"Connection",
        b"Proxy-Connection",
        b"Keep-Alive",
        b"Proxy-Authorization",
        b"Proxy-Authenticate",
        b"TE",
        b"Upgrade",
        b"X-Forwarded-For",
        b"Authorization",
    ]
)
_plain_values = st.sampled_from(
    [
        b"",
        b" 5",
        b"5 ",
        b"12",
        b"05",
        b"5, 5",
        b"-1",
        b"1234567890123456789",
        b"close",
        b" Keep-Alive",
        b"keep-alive, close",
        b"close, X-Forwarded-For",
        b"Upgrade",
        b"chunked",
        b"Basic dXNlcjpwYXNz",
        b"example.com:8080",
        b"Example.COM:8080",
        b"example.com",
        b"\x00\x7f\xff",
    ]
)
# Mostly well-formed fields (the fast path's ground), some malformed ones.
_plain_field = st.tuples(_plain_names, st.sampled_from([b":", b": "]), _plain_values).map(b"".join)
_odd_field = st.one_of(
    st.tuples(
        st.sampled_from([b"Bad Name", b" Folded", b"Host ", b"", b"\xffName"]),
        st.sampled_from([b":", b" :", b""]),
        st.sampled_from([b"x", b"a\rb", b"a\nb"]),
    ).map(b"".join),
    st.binary(max_size=12),
)
_any_field = st.one_of(_plain_field, _plain_field, _plain_field, _odd_field)
_request_lines = st.tuples(
    st.sampled_from([b"GET", b"POST", b"HEAD", b"CONNECT", b"get", b"PURGE", b"G(T", b""]),
    st.sampled_from(
        [
            b"http://example.com/x?y#z",
            b"http://Example.COM:8080",
            b"HTTP://example.com/",
            b"http://user:pw@[::1]:81/a",
            b"https://example.com/",
            b"/session/",
            b"example.com:443",
            b"[2001:db8::1]:443",
            b"example.com",
            b"*",
            b"http://exa\nmple.com/",
            b"http://example.com:99999/",
            b"http://ex\xe4mple.com/",
            b"",
        ]
    ),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1"]),
).map(b" ".join)
_separators = st.one_of(
    st.just([]), st.just([]), st.lists(st.sampled_from([b"\r\n", b"\n", b"\r"]), max_size=3)
)


def _join(first: bytes, fields: list[bytes], seps: list[bytes]) -> bytes:
    head = first
    for index, field in enumerate(fields):
        head += (seps[index % len(seps)] if seps else b"\r\n") + field
    return head


def _outcome(parse, *args):  # type: ignore[no-untyped-def]
    try:
        return parse(*args)
    except HTTPError as e:
        return ("error", e.status, e.message)


@given(_request_lines, st.lists(_any_field, max_size=8), _separators)
@settings(max_examples=FUZZ_EXAMPLES * 4)
def test_fast_request_parse_equals_the_general_parse(
    line: bytes, fields: list[bytes], seps: list[bytes]
) -> None:
    """
    Wherever the fast path answers, the general parser gives an equal Request.
    """
    head = _join(line, fields, seps)
    fast = _outcome(http._parse_request_fast, head, 128)
    if fast is None:
        return
    assert fast == _outcome(http._parse_request_general, head, 128)


@given(
    st.sampled_from(
        [
            b"HTTP/1.1 200 OK",
            b"HTTP/1.1 200",
            b"HTTP/1.1 200 ",
            b"HTTP/1.0 404 Not Found",
            b"HTTP/1.1 204 No Content",
            b"HTTP/1.1 304 Not Modified",
            b"HTTP/1.1 101 Switching",
            b"HTTP/1.1 407 Proxy Authentication Required",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 20",
            b"HTTP/1.1 020 OK",
            b"HTTP/1.1  200 OK",
            b"HTTP/2.0 200 OK",
            b"ICY 200 OK",
            b"HTTP/1.1 200 O\nK",
        ]
    ),
    st.lists(_any_field, max_size=8),
    _separators,
    st.sampled_from([b"GET", b"HEAD", b"CONNECT", b"POST"]),
)
@settings(max_examples=FUZZ_EXAMPLES * 4)
def test_fast_response_parse_equals_the_general_parse(
    line: bytes, fields: list[bytes], seps: list[bytes], method: bytes
) -> None:
    """
    Wherever the fast path answers, the general parser gives an equal Response.
    """
    head = _join(line, fields, seps)
    fast = _outcome(http._parse_response_fast, head, method)
    if fast is None:
        return
    assert fast == _outcome(http._parse_response_general, head, method)


@pytest.mark.parametrize(
    "head",
    [
        # wrk, curl -x, curl -x with credentials and -p, a browser-like client.
        b"GET http://bench.parent/ HTTP/1.1\r\nHost: 127.0.0.1:10201",
        b"GET http://bench.parent/ HTTP/1.1\r\nHost: 127.0.0.1:10201\r\nConnection: close",
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/7.88.1"
        b"\r\nAccept: */*\r\nProxy-Connection: Keep-Alive",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
        b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\nUser-Agent: curl/7.88.1",
        b"POST http://example.com/form HTTP/1.1\r\nHost: example.com\r\nContent-Length: 12"
        b"\r\nContent-Type: application/x-www-form-urlencoded\r\nCookie: a=b",
        b"GET http://example.com/ HTTP/1.0\r\nConnection: keep-alive",
    ],
)
def test_usual_requests_take_the_fast_path(head: bytes) -> None:
    """
    The fast path is not a dead branch: the usual heads take it.
    """
    request = http._parse_request_fast(head, 128)
    assert request is not None
    assert request == http._parse_request_general(head, 128)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 512\r\nDate: x",
        b"HTTP/1.1 200 Connection established",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0",
        b"HTTP/1.1 204 No Content",
    ],
)
def test_usual_responses_take_the_fast_path(head: bytes) -> None:
    response = http._parse_response_fast(head, b"GET")
    assert response is not None
    assert response == http._parse_response_general(head, b"GET")


@pytest.mark.parametrize(
    "head",
    [
        b"GET http://a/ HTTP/1.1\r\nProxy-Authorization: Basic b25l"
        b"\r\nProxy-Authorization: Basic dHdv",
        b"GET http://exa\nmple.com/ HTTP/1.1\r\nHost: a",
        b"GET http://a/\r HTTP/1.1",
        b"GET http://a/ HTTP/1.1" + b"\r\nX-Many: 1" * 129,
        b"POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 12",
        b"POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5",
        b"GET http://a/ HTTP/1.1\r\nConnection: close, X-Trace\r\nX-Trace: 1",
        b"GET http://a/ HTTP/1.1\r\nProxy-Connection: keep-alive, Cookie\r\nCookie: a=b",
        b"GET http://a/ HTTP/1.0\r\nConnection: keep-alive\r\nProxy-Connection: close",
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\nhost: b",
        b"GET http://a/ HTTP/1.1\r\nTE: trailers",
        b"GET http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked",
    ],
)
def test_fast_request_edges(head: bytes) -> None:
    """
    Heads at the fast path's edges (repeated or connection-naming fields):
    where it answers, it answers as the general parser does.
    """
    fast = _outcome(http._parse_request_fast, head, 128)
    assert fast is None or fast == _outcome(http._parse_request_general, head, 128)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 12",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5",
        b"HTTP/1.1 200 OK\r\nConnection: close, X-Trace\r\nX-Trace: 1\r\nContent-Length: 0",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0",
        b"HTTP/1.1 200 Connection established\r\nContent-Length: 7",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked",
        b"HTTP/1.1 200 OK" + b"\r\nX-Many: 1" * 129,
    ],
)
@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"CONNECT"])
def test_fast_response_edges(head: bytes, method: bytes) -> None:
    fast = _outcome(http._parse_response_fast, head, method)
    assert fast is None or fast == _outcome(http._parse_response_general, head, method)


@pytest.mark.parametrize(
    ("head", "retryable"),
    [
        (b"GET http://h/ HTTP/1.1\r\nHost: h", True),
        (b"HEAD http://h/ HTTP/1.1\r\nHost: h", True),
        (b"PUT http://h/ HTTP/1.1\r\nHost: h\r\nContent-Length: 0", True),
        (b"DELETE http://h/ HTTP/1.1\r\nHost: h", True),
        (b"GET http://h/ HTTP/1.1\r\nHost: h\r\nContent-Length: 3", False),
        (b"PUT http://h/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked", False),
        (b"POST http://h/ HTTP/1.1\r\nHost: h", False),
        (b"PATCH http://h/ HTTP/1.1\r\nHost: h", False),
        (b"CONNECT h:443 HTTP/1.1\r\nHost: h:443", False),
    ],
)
def test_retryable(head: bytes, retryable: bool) -> None:
    """
    Only idempotent requests without a body may be sent twice (a kept
    upstream connection that turns out closed).
    """
    assert parse_request_head(head).retryable is retryable
