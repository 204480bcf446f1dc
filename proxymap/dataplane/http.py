"""
HTTP/1.1 message heads and body framing, as a proxy needs them.

Nothing here touches a socket.  Heads are parsed once into what the proxy
needs (target, framing, persistence) plus the end-to-end header lines, kept
raw so that forwarding a head is a join rather than a re-serialisation.
Bodies are never parsed, only *framed*: a framer is fed bytes and says how
many of them belong to the current message, so bodies stream through in the
chunks they arrived in (RFC 9112 section 6).
"""

from __future__ import annotations

import functools
import re

import attrs

#: Largest request or response head accepted (request line/status line and headers).
MAX_HEAD_SIZE = 64 * 1024
#: Most header lines accepted in one head.
MAX_HEADERS = 128
#: Longest chunk-size or trailer line accepted in a chunked body.
MAX_CHUNK_LINE = 4096

# Hop-by-hop fields (RFC 9110 section 7.6.1): they describe one connection and
# are never forwarded.  Proxy-Authorization is the client's credentials to
# *us*; Proxy-Authenticate is the vendor's challenge to *us*.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"upgrade",
    }
)
# Fields that frame the message: a Connection option naming them is ignored,
# because removing them after framing was decided would desynchronise the peers.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"host"})

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_COMMON_METHODS = frozenset(
    {b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT"}
)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
# scheme :// authority, then the rest (path, query, fragment) from the first / ? or #.
_ABSOLUTE = re.compile(rb"([^:/?#]*)://([^/?#]*)(.*)", re.S)
# A URI's host is ASCII (RFC 3986 3.2.2; an IDN travels as punycode).
_AUTHORITY = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[^:\[\]@/?#\s\x80-\xff]+)(?::([0-9]{1,5}))?")
# A header block (after the first line) made only of well-formed fields: a
# token name, a colon, and a value free of CR, LF and NUL.  Heads that are not
# this take the general path, which says what is wrong with them.
_PLAIN_FIELDS = rb"((?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\x00]*)*)"
# A whole plain request head: a common method, a target free of spaces, CR,
# LF and NUL, HTTP/1.x, and plain fields.
_PLAIN_REQUEST = re.compile(
    rb"(GET|POST|PUT|HEAD|DELETE|OPTIONS|PATCH|CONNECT) ([^ \r\n\x00]+) (HTTP/1\.[01])"
    + _PLAIN_FIELDS
)
# A whole plain response head: HTTP/1.x, a status code not starting with 0,
# an optional reason free of CR, LF and NUL, and plain fields.
_PLAIN_RESPONSE = re.compile(
    rb"(HTTP/1\.[01]) ([1-9][0-9][0-9])(?: ([^\r\n\x00]*))?" + _PLAIN_FIELDS
)
# The fields of a (lowercased) plain block that mean anything to the proxy.
# Anything else is forwarded untouched and needs no look.
_NOTABLE_REQUEST = re.compile(
    rb"\r\n(host|content-length|proxy-authorization|connection|proxy-connection"
    rb"|keep-alive|proxy-authenticate|te|upgrade|transfer-encoding):([^\r]*)"
)
_NOTABLE_RESPONSE = re.compile(
    rb"\r\n(content-length|connection|proxy-connection"
    rb"|keep-alive|proxy-authorization|proxy-authenticate|te|upgrade|transfer-encoding):([^\r]*)"
)


class HTTPError(Exception):
    """
    A message the proxy cannot accept; carries the status to answer with.
    """

    def __init__(self, status: int, message: str, headers: list[bytes] | None = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        #: Extra header lines for the error response (e.g. a challenge).
        self.headers = headers


def error_kind(status: int, message: str) -> str:
    """
    What kind of upstream failure the data plane reported (by its status and
    message): one classification for metrics and for SOCKS reply codes.
    """
    if "timed out" in message or status == 504:
        return "timeout"
    if "cannot connect" in message or "cannot look up" in message:
        return "unreachable"
    if message.startswith("TLS with"):
        return "tls"
    if "rejected" in message:
        return "credentials"
    if "refused the tunnel" in message:
        return "refused"
    if "closed" in message:
        return "closed"
    return "bad_response"


#: Methods a client expects may be repeated (RFC 9110 9.2.2).
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


@attrs.define(slots=True)
class Request:
    """
    A parsed request head.

    ``host``/``port`` are the target for absolute-form and CONNECT requests
    and ``None`` for origin-form; ``path`` is the origin-form target.
    """

    method: bytes
    target: bytes
    version: bytes
    lines: list[bytes]
    host: str | None
    port: int
    path: bytes
    has_host_header: bool
    content_length: int | None
    chunked: bool
    keep_alive: bool
    proxy_authorization: bytes | None
    header_host: bytes | None = None
    #: The header block exactly as received (``b"\r\nName: value..."``) when
    #: no field had to be removed from it, else ``None``: forwarding it
    #: verbatim saves rebuilding the head from ``lines``.
    verbatim: bytes | None = None
    #: The protocols the client asks to switch this connection to (its
    #: Upgrade field), when the request may carry them upstream: HTTP/1.1,
    #: Upgrade named by Connection (RFC 9110 7.8), and no body.  ``None``:
    #: the Upgrade field, if any, is dropped as the hop-by-hop field it is.
    upgrade: bytes | None = None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def retryable(self) -> bool:
        """
        Whether this request may be sent again if the connection it went
        over closes before any answer (RFC 9110 9.2.2: idempotent, and no
        body to have been half sent).
        """
        return self.method in IDEMPOTENT and not self.chunked and not self.content_length

    @property
    def host_header(self) -> bytes:
        """
        The Host field of a request that goes upstream without the client's
        (it sent none, as HTTP/1.0 clients may, or one naming another host
        than its target): the target's authority as the client wrote it,
        less any userinfo (RFC 9112 3.2.2).
        """
        if self.method == b"CONNECT":
            return self.target
        return _target_authority(self.target)


@attrs.define(slots=True)
class Response:
    """
    A parsed response head.
    """

    version: bytes
    status: int
    reason: bytes
    lines: list[bytes]
    content_length: int | None
    chunked: bool
    until_close: bool
    keep_alive: bool
    #: The whole head as received when it is HTTP/1.1 and no field had to be
    #: removed (the same bytes a rebuild would give, without the rebuild).
    verbatim: bytes | None = None
    #: The Upgrade field's value (a 101 names the protocol it switched to).
    upgrade: bytes | None = None


def _split_head(head: bytes, max_headers: int = MAX_HEADERS) -> list[bytes]:
    lines = head.split(b"\r\n")
    # A bare CR or LF inside a line is a classic request-smuggling device.
    if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
        raise HTTPError(400, "bare CR or LF in the message head")
    # So is a NUL, which a recipient must reject or replace (RFC 9110, 5.5);
    # forwarded as it came, the next hop might read it as the end.
    if b"\x00" in head:
        raise HTTPError(400, "NUL in the message head")
    if len(lines) - 1 > max_headers:
        raise HTTPError(431, f"more than {max_headers} header fields")
    return lines


def _parse_content_length(value: bytes, current: int | None) -> int:
    text = value.strip()
    if current is None and text.isdigit() and len(text) <= 18:
        return int(text)  # the usual case: one plain number
    values = {v.strip() for v in value.split(b",")}
    if len(values) != 1:
        raise HTTPError(400, "conflicting Content-Length values")
    text = values.pop()
    if not text.isdigit() or len(text) > 18:
        raise HTTPError(400, "invalid Content-Length")
    length = int(text)
    if current is not None and current != length:
        raise HTTPError(400, "conflicting Content-Length values")
    return length


def _one_content_length(lines: list[bytes], length: int) -> list[bytes]:
    """
    ``lines`` with their repeated Content-Length (``5, 5``, or on two lines)
    made one, as a recipient that accepts them must before forwarding
    (RFC 9110 8.6).
    """
    kept = [line for line in lines if line[:15].lower() != b"content-length:"]
    return [*kept, b"Content-Length: %d" % length]


def _joined(current: bytes | None, value: bytes) -> bytes:
    """
    A field's value with one more line's added (RFC 9110 5.3: repeated
    fields are one comma-separated list).
    """
    value = value.strip()
    return value if current is None else current + b", " + value


def _connection_tokens(value: bytes) -> set[bytes]:
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


def _filter_fields(lines: list[bytes], options: set[bytes]) -> list[bytes]:
    """
    Remove the fields a Connection header named, except framing fields.
    """
    options = options - _FRAMING - {b"close", b"keep-alive"}
    if not options:
        return lines
    return [line for line in lines if line.partition(b":")[0].strip().lower() not in options]


@functools.lru_cache(maxsize=4096)
def parse_authority(authority: bytes, default_port: int | None) -> tuple[str, int]:
    """
    Split ``host[:port]`` (``[v6]:port`` too) into a host and a port.

    Cached: a scraper asks for the same few hosts again and again, and the
    answer depends on nothing else (errors are raised, never cached).
    """
    match = _AUTHORITY.fullmatch(authority)
    if match is None:
        raise HTTPError(400, "invalid host in request target")
    host = match.group(1).strip(b"[]").decode("ascii", "replace")
    if match.group(2) is None:
        if default_port is None:
            raise HTTPError(400, "CONNECT target needs a port")
        return host, default_port
    port = int(match.group(2))
    if not 0 < port < 65536:
        raise HTTPError(400, "invalid port in request target")
    return host, port


def parse_request_head(head: bytes, max_headers: int = MAX_HEADERS) -> Request:
    """
    Parse a request head (without its final blank line).

    Most heads take a fast path; the rest (and every malformed head) take the
    general one.  Both give equal results wherever the fast one answers
    (tests/test_http.py checks this on generated heads).
    """
    return _parse_request_fast(head, max_headers) or _parse_request_general(head, max_headers)


def _connection_flags(value: bytes) -> tuple[bool, bool] | None:
    """
    The close and keep-alive options of a lowercased Connection value, or
    ``None`` if it names anything else (the general path removes those fields).
    """
    close = keep = False
    for token in value.split(b","):
        token = token.strip()
        if token == b"close":
            close = True
        elif token == b"keep-alive":
            keep = True
        elif token:
            return None
    return close, keep


def _without(block: bytes, spans: list[tuple[int, int]]) -> bytes:
    """
    ``block`` with the given (ordered, disjoint) spans cut out.
    """
    pieces = []
    start = 0
    for begin, end in spans:
        pieces.append(block[start:begin])
        start = end
    pieces.append(block[start:])
    return b"".join(pieces)


def _parse_request_fast(head: bytes, max_headers: int) -> Request | None:
    """
    Parse the usual request head in a few C-level passes, or return ``None``
    to leave it to :func:`_parse_request_general`.

    It answers only for a common method, HTTP/1.x, a header block of plain
    fields, and no field it would have to interpret beyond Host, one plain
    Content-Length, Proxy-Authorization and Connection/Proxy-Connection
    saying close or keep-alive.
    """
    plain = _PLAIN_REQUEST.fullmatch(head)
    if plain is None:
        return None
    method, target, version, block = plain.groups()
    if block.count(b"\n") > max_headers:
        return None
    content_length: int | None = None
    proxy_authorization: bytes | None = None
    header_host: bytes | None = None
    host_match: re.Match[bytes] | None = None
    close = keep = False
    dropped: list[tuple[int, int]] = []
    for match in _NOTABLE_REQUEST.finditer(block.lower()):
        name = match.group(1)
        if name == b"host":
            if header_host is not None:
                return None
            header_host = block[match.start(2) : match.end(2)].strip()
            host_match = match
        elif name == b"content-length":
            text = match.group(2).strip()
            if content_length is not None or not text.isdigit() or len(text) > 18:
                return None
            content_length = int(text)
        elif name == b"proxy-authorization":
            proxy_authorization = block[match.start(2) : match.end(2)].strip()
            dropped.append(match.span())
        elif name == b"connection" or name == b"proxy-connection":
            flags = _connection_flags(match.group(2))
            if flags is None:
                return None
            close |= flags[0]
            keep |= flags[1]
            dropped.append(match.span())
        else:
            return None
    host, port, path, authority, target = _request_target(method, target)
    if header_host != authority and _names_another_host(method, header_host, authority):
        assert host_match is not None  # header_host was set with it
        dropped = sorted([*dropped, host_match.span()])
        header_host = None
    kept = _without(block, dropped) if dropped else block
    if version == b"HTTP/1.1":
        keep_alive = not close
    else:
        keep_alive = keep and not close
    return Request(
        method,
        target,
        version,
        kept[2:].split(b"\r\n") if kept else [],
        host,
        port,
        path,
        header_host is not None,
        content_length,
        False,
        keep_alive,
        proxy_authorization,
        header_host,
        None if dropped else block,
    )


def _request_target(
    method: bytes, target: bytes
) -> tuple[str | None, int, bytes, bytes | None, bytes]:
    """
    The host, port and origin-form path a request target names, its
    authority as written (less any userinfo; ``None`` in origin form), and
    the target to forward.

    That is the target as it came, but for a ``ws://`` one, which goes on as
    ``http://``: some clients (aiohttp) ask a proxy for a plain WebSocket
    so, where RFC 6455 4.1 would have them CONNECT, and the next proxy
    need not know the scheme.  ``wss://`` needs TLS to the origin, which
    is the client's to make: it is told to CONNECT.
    """
    if method == b"CONNECT":
        host, port = parse_authority(target, None)
        return host, port, target, target, target
    if target[:1] == b"/":
        return None, 0, target, None, target
    match = _ABSOLUTE.match(target)
    if match is None:
        raise HTTPError(400, "request target is neither absolute nor origin form")
    scheme, authority, path = match.groups()
    if scheme != b"http":
        lowered = scheme.lower()
        if lowered == b"ws":
            target = b"http" + target[2:]
        elif lowered != b"http":
            raise HTTPError(
                400, f"cannot forward {scheme.decode('ascii', 'replace')}:// requests; use CONNECT"
            )
    if b"@" in authority:
        authority = authority.rpartition(b"@")[2]
    host, port = parse_authority(authority, 80)
    if path[:1] != b"/":
        path = b"/" + path
    return host, port, path, authority, target


def _target_authority(target: bytes) -> bytes:
    """
    The authority of an absolute-form target, less any userinfo.
    """
    match = _ABSOLUTE.match(target)
    assert match is not None  # the target was parsed
    return match.group(2).rpartition(b"@")[2]


def _names_another_host(method: bytes, header_host: bytes | None, authority: bytes | None) -> bool:
    """
    Whether a request's Host field must be replaced on its way upstream: an
    absolute-form request whose Host names another host than its target
    (RFC 9112 3.2.2: a proxy ignores the received Host and sends the
    target's).  CONNECT keeps what it has: its target is all that counts.
    Callers ask only when the two differ byte for byte (the usual request
    never calls); here a difference of case alone is no other host.
    """
    return (
        header_host is not None
        and authority is not None
        and method != b"CONNECT"
        and header_host.lower() != authority.lower()
    )


def _parse_request_general(head: bytes, max_headers: int) -> Request:
    """
    Parse any request head, and say exactly what is wrong with a bad one.
    """
    lines = _split_head(head, max_headers)
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if method not in _COMMON_METHODS and not _TOKEN.fullmatch(method):
        raise HTTPError(400, "malformed request method")
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if re.fullmatch(rb"HTTP/[0-9]\.[0-9]", version):
            raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise HTTPError(400, "malformed HTTP version")
    if not target:
        raise HTTPError(400, "empty request target")

    kept: list[bytes] = []
    options: set[bytes] = set()
    content_length: int | None = None
    transfer_encoding: bytes | None = None
    proxy_authorization: bytes | None = None
    header_host: bytes | None = None
    upgrade: bytes | None = None
    dropped = False
    lengths = 0
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        # A name is a token (RFC 9110 5.1): no space before the colon, none
        # inside ("Transfer Encoding"), nothing the next hop might read as
        # another name than this proxy did.
        if not sep or not _TOKEN.fullmatch(name):
            raise HTTPError(400, "malformed header field")
        lname = name.lower()
        if lname in _HOP_BY_HOP:
            if lname == b"connection" or lname == b"proxy-connection":
                options |= _connection_tokens(value)
            elif lname == b"proxy-authorization":
                proxy_authorization = value.strip()
            elif lname == b"upgrade":
                upgrade = _joined(upgrade, value)
            dropped = True
            continue
        if lname == b"content-length":
            content_length = _parse_content_length(value, content_length)
            lengths += 1 + value.count(b",")
        elif lname == b"transfer-encoding":
            value = value.strip().lower()
            transfer_encoding = (
                value if transfer_encoding is None else transfer_encoding + b", " + value
            )
        elif lname == b"host":
            if header_host is not None:
                raise HTTPError(400, "more than one Host header")
            header_host = value.strip()
        kept.append(line)

    chunked = False
    if transfer_encoding is not None:
        if content_length is not None:
            raise HTTPError(400, "both Transfer-Encoding and Content-Length")
        codings = [c.strip() for c in transfer_encoding.split(b",")]
        if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
            raise HTTPError(400, "request Transfer-Encoding must end in chunked")
        chunked = True
    elif lengths > 1:
        assert content_length is not None  # counted with it
        kept = _one_content_length(kept, content_length)
        dropped = True
    if options:
        filtered = _filter_fields(kept, options)
        dropped = dropped or len(filtered) != len(kept)
        kept = filtered

    if version == b"HTTP/1.1":
        keep_alive = b"close" not in options
    else:
        # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has
        # faulty framing; the connection closes after it.
        keep_alive = b"keep-alive" in options and b"close" not in options and not chunked
    # An upgrade goes on only as a switch the proxy can follow: asked for
    # properly, of HTTP/1.1 (RFC 9110 7.8 has an HTTP/1.0 Upgrade ignored),
    # and with no body, whose end the switch would otherwise have to await.
    if (
        not upgrade
        or b"upgrade" not in options
        or version != b"HTTP/1.1"
        or method == b"CONNECT"
        or chunked
        or content_length
    ):
        upgrade = None

    host, port, path, authority, target = _request_target(method, target)
    if header_host != authority and _names_another_host(method, header_host, authority):
        kept = [line for line in kept if line.partition(b":")[0].lower() != b"host"]
        dropped = True
        header_host = None
    return Request(
        method=method,
        target=target,
        version=version,
        lines=kept,
        host=host,
        port=port,
        path=path,
        has_host_header=header_host is not None,
        content_length=content_length,
        chunked=chunked,
        keep_alive=keep_alive,
        proxy_authorization=proxy_authorization,
        header_host=header_host,
        verbatim=None if dropped else head[len(lines[0]) :],
        upgrade=upgrade,
    )


def parse_response_head(head: bytes, request_method: bytes) -> Response:
    """
    Parse a response head and decide how its body is framed.

    As with requests, the usual head takes a fast path that answers exactly
    as the general one would.
    """
    return _parse_response_fast(head, request_method) or _parse_response_general(
        head, request_method
    )


def _parse_response_fast(head: bytes, request_method: bytes) -> Response | None:
    """
    Parse the usual response head, or return ``None`` to leave it to
    :func:`_parse_response_general`: an HTTP/1.x status line, plain fields,
    and none to interpret beyond one plain Content-Length and Connection
    saying close or keep-alive.
    """
    plain = _PLAIN_RESPONSE.fullmatch(head)
    if plain is None:
        return None
    version, code, reason, block = plain.groups()
    if block.count(b"\n") > MAX_HEADERS:
        return None
    status = int(code)
    reason = reason or b""
    content_length: int | None = None
    close = keep = False
    dropped: list[tuple[int, int]] = []
    for match in _NOTABLE_RESPONSE.finditer(block.lower()):
        name = match.group(1)
        if name == b"content-length":
            text = match.group(2).strip()
            if content_length is not None or not text.isdigit() or len(text) > 18:
                return None
            content_length = int(text)
        elif name == b"connection" or name == b"proxy-connection":
            flags = _connection_flags(match.group(2))
            if flags is None:
                return None
            close |= flags[0]
            keep |= flags[1]
            dropped.append(match.span())
        else:
            return None
    kept = _without(block, dropped) if dropped else block
    if version == b"HTTP/1.1":
        keep_alive = not close
    else:
        keep_alive = keep and not close
    until_close = False
    if request_method == b"HEAD" or status < 200 or status == 204 or status == 304:
        content_length = 0
    elif request_method == b"CONNECT" and status < 300:
        content_length = 0
    elif content_length is None:
        until_close = True
        keep_alive = False
    return Response(
        version,
        status,
        reason,
        kept[2:].split(b"\r\n") if kept else [],
        content_length,
        False,
        until_close,
        keep_alive,
        head if version == b"HTTP/1.1" and reason and not dropped else None,
    )


def _parse_response_general(head: bytes, request_method: bytes) -> Response:
    """
    Parse any response head, and say exactly what is wrong with a bad one.
    """
    try:
        lines = _split_head(head)
    except HTTPError as e:
        # The vendor's fault, not the client's: a 502, as for any bad response.
        raise HTTPError(502, f"the upstream sent a malformed response head ({e.message})") from None
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if (
        (version != b"HTTP/1.1" and version != b"HTTP/1.0")
        or len(code) != 3
        or not code.isdigit()
        or code[:1] == b"0"
    ):
        raise HTTPError(502, "the upstream sent a malformed status line")
    status = int(code)

    kept: list[bytes] = []
    options: set[bytes] = set()
    content_length: int | None = None
    transfer_encoding: bytes | None = None
    upgrade: bytes | None = None
    dropped = False
    lengths = 0
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        # Lenient with other odd names, which clients judge for themselves.
        if not sep or not name or name[-1:] in b" \t" or name[:1] in b" \t":
            raise HTTPError(502, "the upstream sent a malformed header field")
        lname = name.lower()
        if lname in _HOP_BY_HOP:
            if lname == b"connection" or lname == b"proxy-connection":
                options |= _connection_tokens(value)
            elif lname == b"upgrade":
                upgrade = _joined(upgrade, value)
            dropped = True
            continue
        if lname == b"content-length":
            try:
                content_length = _parse_content_length(value, content_length)
            except HTTPError:
                raise HTTPError(502, "the upstream sent an invalid Content-Length") from None
            lengths += 1 + value.count(b",")
        elif lname == b"transfer-encoding":
            value = value.strip().lower()
            transfer_encoding = (
                value if transfer_encoding is None else transfer_encoding + b", " + value
            )
        kept.append(line)
    if options:
        filtered = _filter_fields(kept, options)
        dropped = dropped or len(filtered) != len(kept)
        kept = filtered

    if version == b"HTTP/1.1":
        keep_alive = b"close" not in options
    else:
        keep_alive = b"keep-alive" in options and b"close" not in options

    chunked = until_close = False
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        content_length = 0
    elif request_method == b"CONNECT" and 200 <= status < 300:
        content_length = 0
    elif transfer_encoding is not None:
        if transfer_encoding.rsplit(b",", 1)[-1].strip() == b"chunked":
            chunked = True
        else:
            until_close = True
        # A Content-Length beside Transfer-Encoding is ignored and must not
        # be forwarded (RFC 9112 6.3).  Framed both ways, the response may
        # have been read one way by a hop before us and the other by us, and
        # HTTP/1.0 has no Transfer-Encoding (6.1): such a connection is not
        # trusted with another request.
        if content_length is not None:
            kept = [line for line in kept if line[:15].lower() != b"content-length:"]
            dropped = True
            keep_alive = False
        if version == b"HTTP/1.0":
            keep_alive = False
        content_length = None
    elif content_length is None:
        until_close = True
    elif lengths > 1:
        kept = _one_content_length(kept, content_length)
        dropped = True
    if until_close:
        keep_alive = False
    return Response(
        version=version,
        status=status,
        reason=reason,
        lines=kept,
        content_length=content_length,
        chunked=chunked,
        until_close=until_close,
        keep_alive=keep_alive,
        verbatim=head if version == b"HTTP/1.1" and reason and not dropped else None,
        upgrade=upgrade,
    )


# ---------------------------------------------------------------- body framing


class LengthFramer:
    """
    Frames a body of known length.
    """

    __slots__ = ("done", "remaining")

    def __init__(self, length: int) -> None:
        self.remaining = length
        self.done = length == 0

    def feed(self, data: bytes) -> int:
        """
        Return how many bytes of ``data`` belong to the body.
        """
        take = min(self.remaining, len(data))
        self.remaining -= take
        if self.remaining == 0:
            self.done = True
        return take


class UntilCloseFramer:
    """
    Frames a response body that ends when the connection does.
    """

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def feed(self, data: bytes) -> int:
        return len(data)


_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class ChunkedFramer:
    """
    Frames a chunked body (RFC 9112 section 7.1) without copying its data.

    With ``decode=True`` the chunk data is also collected in :attr:`decoded`
    (for an HTTP/1.0 client, which cannot read chunked framing).
    """

    __slots__ = ("_decode", "_line", "_remaining", "_state", "decoded", "done")

    def __init__(self, decode: bool = False) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._line = b""
        self._decode = decode
        self.decoded: list[bytes] = []
        self.done = False

    def feed(self, data: bytes) -> int:
        """
        Return how many bytes of ``data`` belong to the body.

        :raises HTTPError: on malformed framing.
        """
        pos = 0
        end = len(data)
        while pos < end and not self.done:
            if self._state == _DATA:
                take = min(self._remaining, end - pos)
                if self._decode:
                    self.decoded.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_END
                continue
            newline = data.find(b"\n", pos)
            if newline == -1:
                self._line += data[pos:]
                if len(self._line) > MAX_CHUNK_LINE:
                    raise HTTPError(400, "chunk line too long")
                return end
            line = self._line + data[pos:newline]
            self._line = b""
            pos = newline + 1
            if line[-1:] != b"\r":
                raise HTTPError(400, "chunk line not terminated by CRLF")
            line = line[:-1]
            # Relayed as they came, so a bare CR (which the next hop may
            # take for a line's end, RFC 9112 2.2) or a NUL is refused.
            if b"\r" in line or b"\x00" in line:
                raise HTTPError(400, "bare CR or NUL in a chunk line")
            if self._state == _SIZE:
                # RFC 9112 7.1: whitespace may come before an extension's
                # ";", never before the size (which h11, for one, refuses).
                size = line.split(b";", 1)[0].rstrip(b" \t")
                if not _HEX.fullmatch(size):
                    raise HTTPError(400, "invalid chunk size")
                self._remaining = int(size, 16)
                self._state = _DATA if self._remaining else _TRAILER
            elif self._state == _DATA_END:
                if line:
                    raise HTTPError(400, "chunk data longer than its size")
                self._state = _SIZE
            elif not line:  # _TRAILER: a blank line ends the body
                self.done = True
        return pos


def build_head(first_line: bytes, lines: list[bytes], extra: list[bytes] | None = None) -> bytes:
    """
    Serialise a head from its first line and header lines.
    """
    if extra:
        lines = lines + extra
    if lines:
        return first_line + b"\r\n" + b"\r\n".join(lines) + b"\r\n\r\n"
    return first_line + b"\r\n\r\n"


#: The answer to a CONNECT that opened its tunnel.
TUNNEL_OPEN = b"HTTP/1.1 200 Connection established\r\n\r\n"


def simple_response(
    status: int,
    reason: str,
    body: bytes,
    content_type: bytes = b"text/plain; charset=utf-8",
    close: bool = True,
    extra: list[bytes] | None = None,
) -> bytes:
    """
    A complete response with a small body, generated by the proxy itself.
    """
    lines = [
        b"Content-Type: " + content_type,
        b"Content-Length: " + str(len(body)).encode(),
    ]
    if close:
        lines.append(b"Connection: close")
    if extra:
        lines.extend(extra)
    return build_head(f"HTTP/1.1 {status} {reason}".encode(), lines) + body


def without_body(response: bytes) -> bytes:
    """
    ``response`` (a whole one the proxy made) as an answer to ``HEAD``: its
    head alone, ``Content-Length`` kept (RFC 9110 9.3.2).  A body after it
    would be read as the start of whatever comes next on the connection.
    """
    return response[: response.index(b"\r\n\r\n") + 4]


REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def error_response(status: int, message: str, extra: list[bytes] | None = None) -> bytes:
    """
    A short text error response that closes the connection.
    """
    reason = REASONS.get(status, "Error")
    body = f"{status} {reason}: {message}\n".encode()
    return simple_response(status, reason, body, extra=extra)
