"""
The client leg: one :class:`ProxyServer` per accepted connection.

A connection carries HTTP/1.1 requests one at a time (pipelined requests
wait, in order, in a bounded buffer), or becomes a tunnel after CONNECT.
What to do with a request is the factory's decision (:class:`ProxyFactory`):
answer it locally, or forward it to an :class:`UpstreamTarget`.  proxymap's
mapped ports and the sandbox vendor are two such factories over the same
protocol.

The protocol is also the connection record the admin API lists: client
address, target, session, upstream leg and counters live here.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

import attrs
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from proxymap.config import Limits, bracketed
from proxymap.credentials import basic_authorization
from proxymap.dataplane import flow, socks
from proxymap.dataplane.deadlines import Deadlines, tick_of, tick_time
from proxymap.dataplane.http import (
    ChunkedFramer,
    HTTPError,
    LengthFramer,
    Request,
    build_head,
    error_kind,
    error_response,
    parse_request_head,
    without_body,
)
from proxymap.dataplane.names import HostCache
from proxymap.dataplane.repeats import Repeats
from proxymap.dataplane.upstream import UpstreamProtocol

if TYPE_CHECKING:
    from proxymap.dataplane.pool import UpstreamPool
    from proxymap.sessions import Session

log = Logger()

_ids = itertools.count(1)


@attrs.frozen
class SocksRoute:
    """
    Reach ``host:port`` through a SOCKS5 upstream, authenticating with
    ``username``/``password`` (RFC 1929).
    """

    username: str
    password: str = attrs.field(repr=False)
    host: str
    port: int
    #: Resolve ``host`` here and send an address, instead of the name.
    resolve_locally: bool = False


@attrs.frozen
class UpstreamTarget:
    """
    Where a request or tunnel goes, and how.

    With ``via_proxy`` the peer at ``host:port`` is a proxy: requests go to it
    in absolute form and tunnels start with CONNECT, both carrying
    ``authorization``.  Without it the peer is the origin itself.  An open
    upstream connection is reused only for a target with an equal ``key``:
    proxymap uses the session, so no request of a new session ever travels
    over a connection opened for an old one.
    """

    host: str
    port: int
    key: object
    authorization: bytes | None = None
    via_proxy: bool = True
    session: Session | None = None
    #: Set when the peer is a SOCKS5 proxy: requests then go in origin form
    #: over a SOCKS CONNECT to the target.
    socks: SocksRoute | None = None
    #: Set when the peer is reached over TLS (an https:// upstream): the
    #: client TLS options (see gatewaytls.py).
    tls: Any = None

    @property
    def peer(self) -> str:
        """
        What the peer at ``host:port`` is called in errors: ``upstream``
        (a proxy) or ``target`` (the origin itself, as the sandbox vendor
        connects to it).
        """
        return "upstream" if self.via_proxy or self.socks is not None else "target"


@attrs.define
class Tally:
    """
    What the ports that share it have in common: their open client
    connections, and the timers of those connections.
    """

    connections: int = 0
    #: Given by the first factory that uses this tally (they share a reactor).
    #: One set of ticks for every port: traffic spread over a thousand ports
    #: still shares a call per tick (a set per port made spreading 8% slower).
    deadlines: Deadlines | None = None
    #: Addresses of upstream host names (see names.py), given by the first
    #: factory like ``deadlines``.
    names: HostCache | None = None
    #: Idle upstream connections kept for later client connections (None:
    #: none are kept; the service gives its tally one, see pool.py).
    pool: UpstreamPool | None = None
    #: Failures logged once per window across every port (see repeats.py),
    #: given by the first factory like ``deadlines``.
    repeats: Repeats | None = None


@attrs.frozen
class LocalResponse:
    """
    A complete response the factory answers itself, without any upstream.

    With ``tunnel`` (an answer to CONNECT) the connection stays open as a
    *local tunnel*: the requests that follow in it are the factory's to
    answer (see :attr:`ProxyServer.local_tunnel`).  With ``tls`` as well, a
    client that opens the tunnel with a TLS handshake (it was asked for an
    ``https://`` URL) gets TLS: ``tls()`` gives the server's context factory
    then, and the requests that follow are read from inside TLS (see
    localtls.py).  Anything else is read as plain HTTP.
    """

    data: bytes
    close: bool = False
    tunnel: bool = False
    tls: Callable[[], Any] | None = None


@implementer(IHalfCloseableProtocol)
class ProxyServer(flow.Throttled):
    """
    The client side of one proxied connection.
    """

    __slots__ = (
        "_body",
        "_body_sink",
        "_buffer",
        "_close_after",
        "_closing",
        "_gone",
        "_head_started",
        "_local_tls",
        "_processing",
        "_refused",
        "_request",
        "_socks",
        "_socks_pending",
        "_target",
        "_tick",
        "_tunnel",
        "_upstream",
        "bytes_down",
        "bytes_up",
        "connected_at",
        "id",
        "last_activity",
        "local_tunnel",
        "protocol",
        "reads",
        "requests",
        "seconds",
        "session",
        "writes",
    )
    factory: ProxyFactory

    def __init__(self) -> None:
        super().__init__()
        self.id = next(_ids)
        self._target: tuple[str, int] | None = None
        self.connected_at = 0.0
        self.last_activity = 0.0
        self.session: Session | None = None
        self.requests = 0
        self.reads = 0
        self.writes = 0
        self.bytes_up = 0
        self.bytes_down = 0
        #: True once a CONNECT was answered locally: what follows in this
        #: connection is addressed to the factory itself, not to a target.
        self.local_tunnel = False
        #: "http", "socks5" or "socks4": told from the first byte.
        self.protocol = ""
        self._socks: socks.Socks5Handshake | socks.Socks4Handshake | None = None
        #: The SOCKS version whose CONNECT still awaits its reply (0: none).
        self._socks_pending = 0
        #: Over a connection limit: answer the first bytes with a refusal.
        self._refused = False
        #: When the first byte of the current request head arrived.
        self._head_started: float | None = None
        #: The tick of this connection's deadline in factory.deadlines (0: none).
        self._tick = 0
        #: A local tunnel's TLS, until its client's first bytes say whether
        #: they start it (see LocalResponse).
        self._local_tls: Callable[[], Any] | None = None

        self._buffer = b""
        self._request: Request | None = None
        self._body: LengthFramer | ChunkedFramer | None = None
        self._body_sink: UpstreamProtocol | None = None
        self._upstream: UpstreamProtocol | None = None
        self._tunnel: UpstreamProtocol | None = None
        self._close_after = False
        self._closing = False
        self._processing = False
        self._gone = False

    # ------------------------------------------------------------ state for the admin API

    @property
    def state(self) -> str:
        if self._gone:
            return "closed"
        if self._tunnel is not None:
            return "tunnel"
        request = self._request
        if request is not None:
            # An upgrade in flight is a tunnel opening, as a CONNECT is.
            opening = request.method == b"CONNECT" or request.upgrade is not None
            return "connecting" if opening else "request"
        return "idle"

    @property
    def target(self) -> str:
        """
        The host:port of the last request or tunnel ("" before any).
        """
        if self._target is None:
            return ""
        host, port = self._target
        return f"{bracketed(host)}:{port}"

    @property
    def upstream(self) -> UpstreamProtocol | None:
        return self._tunnel or self._upstream

    def abort(self) -> None:
        """
        Close this connection and its upstream leg now.
        """
        up = self.upstream
        if up is not None:
            up.abort()
        if self.transport is not None and not self._gone:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    @property
    def client(self) -> str:
        """
        The client's address as ``host:port``, for the admin API and log
        lines: built when asked, not for every connection.
        """
        peer = None if self.transport is None else self.transport.getPeer()
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', 0)}"

    # ------------------------------------------------------------ connection events

    def connectionMade(self) -> None:
        factory = self.factory
        self.seconds = factory.seconds
        self.connected_at = self.last_activity = self.seconds()
        limits = factory.limits
        if (
            len(factory.connections) >= limits.max_connections_per_port
            or factory.tally.connections >= limits.max_connections
        ):
            self._refused = True
        else:
            factory.connections[self.id] = self
            tally = factory.tally
            tally.connections += 1
            pool = tally.pool
            if pool and tally.connections + len(pool) > limits.max_connections:
                # Kept upstream connections give way to clients (file descriptors).
                pool.evict()
        self._arm(limits.head_timeout)

    def dataReceived(self, data: bytes) -> None:
        self.reads += 1
        self.last_activity = self.seconds()
        tunnel = self._tunnel
        if tunnel is not None:
            n = len(data)
            self.bytes_up += n
            session = self.session
            if session is not None:
                session.bytes_up += n
            flow.send(tunnel.transport, data)
            return
        if self._closing:
            return
        if self._local_tls is not None and self._start_local_tls(data):
            return
        if not self.protocol:
            self._choose_protocol(data[:1])
            if self._refused:
                self._refuse()
                return
            if self._closing:
                return
        if self._socks is not None:
            self._socks_feed(data)
            return
        if self._body is not None:
            data = self._feed_body(data)
            if not data:
                return
        self._buffer = self._buffer + data if self._buffer else data
        self._process()

    def readConnectionLost(self) -> None:
        self._read_closed = True
        tunnel = self._tunnel
        if tunnel is not None:
            flow.close_write(tunnel.transport)
        elif self._request is None:
            flow.close(self.transport)
            return
        elif self._body is not None:
            # The body ended before its length or last chunk (RFC 9112, 8:
            # an incomplete message).  An answer under way finishes, then
            # the connection ends (response_done: nothing can follow a cut body).
            if self._body_broken(400, "the request body ended before its declared length"):
                return
        # Otherwise the request in flight and any whole ones pipelined
        # after it are answered, then the connection ends (_finish_request).
        if self._write_closed:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        self._closing = True
        if self._tick:
            self.factory.deadlines.discard(self, self._tick)
            self._tick = 0
        if self.factory.connections.pop(self.id, None) is not None:
            self.factory.tally.connections -= 1
        if self.session is not None:
            self.session.connections.discard(self)
        up = self.upstream
        if up is not None:
            if self._tunnel is not None and reason.check(ConnectionDone):
                up.close()
            elif self._request is None and self._tunnel is None:
                self._release(up)
            else:
                up.abort()
        self._upstream = self._tunnel = None

    # ------------------------------------------------------------ timeouts

    def _arm(self, delay: float) -> None:
        self._tick = self.factory.deadlines.add(self, self.seconds() + max(delay, 0.05))

    @property
    def timer_due(self) -> float | None:
        """
        When this connection next looks at its deadline (None: never).
        """
        return tick_time(self._tick) if self._tick else None

    def wake_by(self, when: float) -> None:
        """
        Make the timer fire no later than ``when`` (to within a tick).
        """
        tick = self._tick
        if tick:
            if tick <= tick_of(when):
                return
            self.factory.deadlines.discard(self, tick)
            self._tick = 0
        if not self._gone:
            self._arm(when - self.seconds())

    def limits_changed(self) -> None:
        """
        The port's limits changed (a reload): a timeout lowered applies at
        once, not from the timer armed under the old one.  (One raised
        needs nothing: the old timer finds the deadline later and re-arms.)
        """
        self.wake_by(self._deadline()[0])

    def _deadline(self) -> tuple[float, str]:
        """
        When this connection times out in its present state, and why.
        """
        deadline, state = self._state_deadline()
        up = self._upstream
        if up is not None and up.connecting and up.connect_deadline < deadline:
            return up.connect_deadline, "connect"
        return deadline, state

    def _state_deadline(self) -> tuple[float, str]:
        limits = self.factory.limits
        if self._tunnel is not None:
            # Reads on either leg move last_activity (the upstream's in deliver).
            return self.last_activity + limits.tunnel_idle_timeout, "tunnel"
        if self._socks is not None or self._refused or not self.protocol:
            return self.connected_at + limits.head_timeout, "handshake"
        if self._request is not None:
            return self.last_activity + limits.idle_timeout, "response"
        if self._head_started is not None:
            return self._head_started + limits.head_timeout, "head"
        return self.last_activity + limits.idle_timeout, "idle"

    def deadline_passed(self) -> None:
        self._tick = 0
        if self._gone:
            return
        deadline, state = self._deadline()
        now = self.seconds()
        if now < deadline:
            # A tunnel stays a tunnel, so its deadline can only move later:
            # one timer for the whole of it.  Other states may turn into one
            # with a nearer deadline (a new request head), so look again soon.
            if state != "tunnel":
                deadline = min(deadline, now + self.factory.limits.head_timeout)
            self._arm(deadline - now)
            return
        log.debug("closing {client}: {state} timeout", client=self.client, state=state)
        if state == "connect":
            assert self._upstream is not None
            self._upstream.connect_timed_out()
        elif state == "head":
            self._fail(408, "the request head took too long")
        elif state == "response" and not (self._upstream and self._upstream.started):
            self._fail(504, "the upstream did not answer in time")
        elif state in ("idle", "handshake"):
            self._fail_quietly()
        else:
            self.abort()

    # ------------------------------------------------------------ SOCKS

    def _choose_protocol(self, first: bytes) -> None:
        allowed = self.factory.protocols
        if first == b"\x05" and "socks5" in allowed:
            self.protocol = "socks5"
            self._socks = socks.Socks5Handshake(
                self.factory.socks_auth_required, self.factory.socks_credentials_ok
            )
        elif first == b"\x04" and "socks4" in allowed:
            self.protocol = "socks4"
            self._socks = socks.Socks4Handshake()
        elif first == b"\x16":
            # A TLS handshake: the client takes this plain proxy for an HTTPS
            # one (curl -x https://...).  Nothing it could read would help;
            # close at once rather than wait out the head timeout.
            log.debug("closing {client}: it sent a TLS handshake", client=self.client)
            self._fail_quietly()
        elif "http" in allowed:
            self.protocol = "http"
        else:
            self._fail_quietly()

    def _refuse(self) -> None:
        """
        Over a connection limit: say so in the client's protocol, then close.
        """
        if self.protocol == "socks5":
            self.write(b"\x05\xff")
        elif self.protocol == "socks4":
            self.write(socks.socks4_reply(False))
        else:
            self.write(error_response(503, "too many connections; try again later"))
        self._fail_quietly()

    def _socks_feed(self, data: bytes) -> None:
        assert self._socks is not None
        step = self._socks.feed(data)
        if step.reply:
            self.write(step.reply)
        if step.close:
            self._fail_quietly()
            return
        connect = step.connect
        if connect is None:
            return
        self._socks = None
        if connect.username is not None and not self.factory.socks_credentials_ok(
            connect.username, connect.password or ""
        ):
            if connect.version == socks.SOCKS5:
                self.write(socks.socks5_reply(socks.NOT_ALLOWED))
            else:
                self.write(socks.socks4_reply(False))
            self._fail_quietly()
            return
        self._socks_pending = connect.version
        # An ASCII name or address (socks.py decodes names as ASCII).
        target = f"{bracketed(connect.host)}:{connect.port}".encode("ascii")
        authorization = None
        if connect.username is not None:
            authorization = basic_authorization(connect.username, connect.password or "")
        request = Request(
            method=b"CONNECT",
            target=target,
            version=b"HTTP/1.1",
            lines=[],
            host=connect.host,
            port=connect.port,
            path=b"",
            has_host_header=False,
            content_length=None,
            chunked=False,
            keep_alive=True,
            proxy_authorization=authorization,
        )
        self._buffer = step.rest
        self._begin(request)

    def _socks_answer(self, ok: bool, status: int = 200, message: str = "") -> None:
        """
        Answer the pending SOCKS CONNECT in its own protocol.
        """
        version, self._socks_pending = self._socks_pending, 0
        if version == socks.SOCKS5:
            code = socks.SUCCEEDED if ok else socks.socks5_code(status, message)
            self.write(socks.socks5_reply(code))
        else:
            self.write(socks.socks4_reply(ok))

    # ------------------------------------------------------------ requests

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while self._request is None and self._buffer and not self._closing:
                buf = self._buffer
                if buf[:2] == b"\r\n":  # RFC 9112 2.2: ignore blank lines before a request
                    self._buffer = buf.lstrip(b"\r\n")
                    continue
                if self._head_started is None:
                    self._head_started = self.last_activity
                end = buf.find(b"\r\n\r\n")
                max_head = self.factory.limits.max_head_size
                if end == -1 or end > max_head:
                    if end > max_head or len(buf) > max_head:
                        if buf.find(b"\r\n", 0, max_head + 2) == -1:
                            self._fail(414, "request line too long")  # RFC 9112 3
                        else:
                            self._fail(431, "request head too large")
                    elif b"\n\n" in buf or b"\n\r\n" in buf:
                        self._fail(400, "request head lines must end in CRLF")
                    return
                self._buffer = buf[end + 4 :]
                self._head_started = None
                try:
                    request = parse_request_head(buf[:end], self.factory.limits.max_headers)
                except HTTPError as e:
                    self._fail(e.status, e.message)
                    return
                self._begin(request)
                if self._body is not None and self._buffer:
                    rest, self._buffer = self._buffer, b""
                    self._buffer = self._feed_body(rest) + self._buffer
        finally:
            self._processing = False
        if self._request is not None and len(self._buffer) > flow.BUFFER_LIMIT:
            self.pause_reading(flow.PIPELINE)

    def _begin(self, request: Request) -> None:
        self._request = request
        self.requests += 1
        if request.host is not None:
            self._target = (request.host, request.port)
        factory = self.factory
        try:
            local = factory.intercept(request, self)
        except HTTPError as e:
            self._fail(e.status, e.message, e.headers)
            return
        if local is not None:
            self._answer_locally(request, local)
            return
        if request.host is None:
            self._fail(
                400,
                "this port is a proxy: send absolute-form requests "
                "(curl -x http://HOST:PORT http://example.com/)",
            )
            return
        try:
            target = factory.target(request, self)
        except HTTPError as e:
            self._fail(e.status, e.message, e.headers)
            return
        self.use_session(target.session)
        if request.method == b"CONNECT":
            self._open_tunnel(request, target)
        else:
            self._forward(request, target)

    def use_session(self, session: Session | None) -> None:
        """
        Count a request against ``session`` and remember it as this connection's.
        """
        if session is None:
            return
        if session is not self.session:
            if self.session is not None:
                self.session.connections.discard(self)
            self.session = session
            session.connections.add(self)
            session.connections_total += 1
        session.requests += 1
        session.last_activity = self.last_activity

    def _answer_locally(self, request: Request, local: LocalResponse) -> None:
        if self._socks_pending:
            if not (local.tunnel and not local.close):
                self._fail(403, "refused locally")
                return
            self._socks_answer(True)
        else:
            # Every local answerer (the Session API, the sandbox) answers
            # HEAD as GET; the body goes here.
            self.write(without_body(local.data) if request.method == b"HEAD" else local.data)
        if local.tunnel and not local.close:
            self.local_tunnel = True
            self._local_tls = local.tls
            if local.tls is not None and self._buffer[:1] == b"\x16":
                # The handshake came with the CONNECT (the client did not wait).
                data, self._buffer = self._buffer, b""
                self._finish_request()
                if not self._closing:
                    self._start_local_tls(data)
                return
            self._finish_request()
            return
        if local.close or not request.keep_alive or request.method == b"CONNECT":
            self._fail_quietly()
            return
        if request.has_body:
            # Read and discard the body, then carry on with the next request.
            self._body = (
                ChunkedFramer() if request.chunked else LengthFramer(request.content_length or 0)
            )
            self._body_sink = None
            return
        self._finish_request()

    def _start_local_tls(self, data: bytes) -> bool:
        """
        The first bytes in a local tunnel that offers TLS: when they open a
        TLS handshake (a record of type 22), start TLS and hand them to it,
        and say so; otherwise the tunnel carries plain HTTP.
        """
        make_options, self._local_tls = self._local_tls, None
        if data[:1] != b"\x16" or make_options is None:
            return False
        transport: Any = self.transport
        transport.startTLS(make_options())
        # The transport now hands what it reads to the TLS layer, which hands
        # the plaintext to this protocol; these bytes were read before.
        transport.protocol.dataReceived(data)
        return True

    def _forward(self, request: Request, target: UpstreamTarget) -> None:
        up = self._upstream
        if up is None or not up.reusable_for(target):
            if up is not None:
                self._upstream = None
                self._release(up)
            pool = self.factory.tally.pool
            parked = pool.take(target.key) if pool is not None and request.retryable else None
            if parked is not None:
                up = self._upstream = parked
                parked.adopt(self)
            else:
                up = self._upstream = UpstreamProtocol.connect(self, target)
        line = b" ".join(
            (request.method, request.target if target.via_proxy else request.path, b"HTTP/1.1")
        )
        extra = []
        if target.authorization is not None:
            extra.append(b"Proxy-Authorization: " + target.authorization)
        if not request.has_host_header:
            extra.append(b"Host: " + request.host_header)
        if request.upgrade is not None:
            # Asked for end to end: the upstream's 101 turns both legs into
            # one tunnel (upstream.UpstreamProtocol._switch).
            extra.append(b"Connection: Upgrade")
            extra.append(b"Upgrade: " + request.upgrade)
        if request.verbatim is not None:
            # Nothing to remove: the client's header block as it came.
            head = b"".join((line, request.verbatim, *(b"\r\n" + e for e in extra), b"\r\n\r\n"))
        else:
            head = build_head(line, request.lines, extra)
        # Heads count as sent bytes, as the response heads coming back do.
        n = len(head)
        self.bytes_up += n
        session = self.session
        if session is not None:
            session.bytes_up += n
        up.send_request(request, head)
        if request.has_body:
            self._body = (
                ChunkedFramer() if request.chunked else LengthFramer(request.content_length or 0)
            )
            self._body_sink = up

    def _feed_body(self, data: bytes) -> bytes:
        body = self._body
        assert body is not None
        try:
            n = body.feed(data)
        except HTTPError as e:
            log.debug(
                "bad request body from {client}: {error}", client=self.client, error=e.message
            )
            if not self._body_broken(e.status, e.message):
                self.abort()  # an answer is under way: the client sees it cut
            return b""
        if n:
            chunk = data if n == len(data) else data[:n]
            self.bytes_up += n
            session = self.session
            sink = self._body_sink
            if sink is not None:
                if session is not None:
                    session.bytes_up += n
                sink.send(chunk)
        if body.done:
            self._body = None
            if self._body_sink is None and self._request is not None:
                self._finish_request()
            self._body_sink = None
        return data[n:] if n < len(data) else b""

    def _body_broken(self, status: int, message: str) -> bool:
        """
        The request body can never be whole.  Unless the upstream has begun
        to answer (``False``: the caller decides), end the connection: after
        the local answer already written when the body was only being
        discarded, else with ``status`` and ``message`` for the client.
        """
        sink = self._body_sink
        if sink is None:
            self._fail_quietly()
        elif not sink.started:  # the upstream still waits for the rest
            self._fail(status, message)
        else:
            return False
        return True

    def _finish_request(self) -> None:
        self._request = None
        if self._close_after or self.factory.draining:
            self._fail_quietly()
            return
        self.resume_reading(flow.PIPELINE)
        if self._buffer:
            self._process()
        if (
            self._read_closed
            and self._request is None
            and not self._processing  # the outer _process goes on with the buffer
            and not self._closing
            and self._tunnel is None
        ):
            # The client sent its FIN and every whole request before it is
            # answered; what is left of the buffer can never be one.
            self._fail_quietly()

    # ------------------------------------------------------------ tunnels

    def _open_tunnel(self, request: Request, target: UpstreamTarget) -> None:
        if self._upstream is not None:
            up, self._upstream = self._upstream, None
            self._release(up)
        self._upstream = UpstreamProtocol.connect(self, target, tunnel=request)

    def tunnel_ready(self, up: UpstreamProtocol, answer: bytes, early: bytes) -> None:
        """
        The upstream accepted the tunnel: answer the client and splice.
        """
        self._upstream = None
        self._tunnel = up
        self._request = None
        if self._socks_pending:
            self._socks_answer(True)
        elif answer:  # else the upstream's own answer went to the client (a 101)
            self.write(answer)
        if early:
            up.deliver(early)
        if self._buffer:
            data, self._buffer = self._buffer, b""
            self.bytes_up += len(data)
            flow.send(up.transport, data)
        self.resume_reading(flow.PIPELINE)
        if self._read_closed:
            flow.close_write(up.transport)

    # ------------------------------------------------------------ upstream events

    def upstream_connected(self, up: UpstreamProtocol) -> None:
        transport = self.transport
        if transport is None or self._gone:
            up.close()
            return
        producer = getattr(transport, "producer", None)
        if producer is not None and producer is not up:
            transport.unregisterProducer()  # type: ignore[attr-defined]
        transport.registerProducer(up, True)  # type: ignore[attr-defined]
        up.transport.registerProducer(self, True)  # type: ignore[union-attr]

    def response_done(self, up: UpstreamProtocol) -> None:
        """
        The upstream finished the response to the request in flight.
        """
        if self._body is not None:
            # The response came before the whole request body: the rest of
            # it cannot be told from a next request, so this connection ends.
            self._close_after = True
            self._body = None
            self._body_sink = None
            if self._upstream is up:
                self._upstream = None
            up.close()
        self._finish_request()

    def upstream_failed(self, up: UpstreamProtocol, status: int, message: str) -> None:
        """
        The upstream leg failed before or during a response.
        """
        if up is not self._upstream and up is not self._tunnel:
            return
        self.factory.upstream_errors[error_kind(status, message)] += 1
        if up.started:
            # Part of a response is already with the client: all we can do is
            # end the connection after what arrived, so the client sees it
            # incomplete (its framing is not satisfied).
            self._upstream = None
            self._fail_quietly()
            return
        self._upstream = None
        self._fail(status, message)

    def upstream_retry(self, up: UpstreamProtocol, request: Request, head: bytes) -> None:
        """
        A reused upstream connection closed before answering ``request``,
        which is safe to send again: send it on a new connection (once; a
        new connection's failure is reported as usual).
        """
        if up is not self._upstream or self._closing:
            return
        pool = self.factory.tally.pool
        if pool is not None:
            pool.retried += 1
        log.debug(
            "upstream {upstream} closed a kept connection; sending the request again",
            upstream=up.address,
        )
        self._upstream = UpstreamProtocol.connect(self, up.target)
        self._upstream.send_request(request, head)

    def upstream_gone(self, up: UpstreamProtocol, clean: bool) -> None:
        """
        An upstream connection of ours closed.
        """
        transport = self.transport
        if transport is not None and getattr(transport, "producer", None) is up:
            transport.unregisterProducer()  # type: ignore[attr-defined]
        # Its transport may have paused us (backpressure): that pause is void
        # now.  A connecting-pause belongs to the current upstream only.
        self.resume_reading(flow.PEER)
        if up is self._upstream or up is self._tunnel:
            self.resume_reading(flow.CONNECTING)
        if up is self._tunnel:
            if clean:
                self.transport.loseConnection()  # type: ignore[union-attr]
            else:
                self.transport.abortConnection()  # type: ignore[union-attr]
        elif up is self._upstream:
            self._upstream = None

    # ------------------------------------------------------------ output

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes_down += len(data)
        flow.send(self.transport, data)

    def _fail(self, status: int, message: str, headers: list[bytes] | None = None) -> None:
        if self._socks_pending:
            self._socks_answer(False, status, message)
        elif not self._closing:
            response = error_response(status, message, headers)
            request = self._request
            if request is not None and request.method == b"HEAD":
                response = without_body(response)
            self.write(response)
        self._fail_quietly()

    def _release(self, up: UpstreamProtocol) -> None:
        """
        Let go of an upstream connection: park it for a later client
        connection of its session if it is idle and may be, else close it.
        """
        pool = self.factory.tally.pool
        if pool is None or self.factory.draining or not pool.park(up):
            up.close()

    def _fail_quietly(self) -> None:
        self._closing = True
        self._request = None
        self._body = None
        self._buffer = b""
        up = self._upstream
        if up is not None:
            self._upstream = None
            self._release(up)
        self.resume_reading(flow.PIPELINE)
        self.transport.loseConnection()  # type: ignore[union-attr]


# Twisted's factories are generic from 26.4 on; below that (setup.cfg admits
# 23.10, and PyPy 3.9 gets 25.5 at most: 26.4's TLS extra needs a
# cryptography with no PyPy 3.9 wheel) subscripting ServerFactory raises.
if TYPE_CHECKING:
    _Factory = ServerFactory[ProxyServer]
else:
    _Factory = ServerFactory


class ProxyFactory(_Factory):
    """
    Base of the factories that own a listening port's proxy behaviour.
    """

    protocol = ProxyServer
    noisy = False
    #: Which protocols clients may speak on this port.
    protocols: frozenset[str] = frozenset({"http", "socks5", "socks4"})
    #: Whether SOCKS5 clients must authenticate (username/password).
    socks_auth_required = False
    #: Shutting down: connections close after their request in flight.
    draining = False

    def socks_credentials_ok(self, username: str, password: str) -> bool:
        """
        Whether SOCKS credentials a client gave are acceptable (by default,
        any: a port without client authentication ignores them).
        """
        return True

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float = 10.0,
        limits: Limits | None = None,
        tally: Tally | None = None,
    ) -> None:
        self.reactor = reactor
        #: The clock read, bound once and shared by every connection of the port.
        self.seconds = reactor.seconds
        self.connect_timeout = connect_timeout
        self.limits = limits or Limits()
        #: Connections across every port sharing this tally.
        self.tally = tally or Tally()
        #: Upstream failures of this port by kind (see error_kind), for metrics.
        self.upstream_errors: Counter[str] = Counter()
        #: Live client connections of this port, by connection id.
        self.connections: dict[int, ProxyServer] = {}
        if self.tally.deadlines is None:
            self.tally.deadlines = Deadlines(reactor)
        #: The connections' timers (see deadlines.py), shared with the tally's ports.
        self.deadlines: Deadlines = self.tally.deadlines
        if self.tally.names is None:
            self.tally.names = HostCache(reactor)
        #: Upstream addresses by name, shared with the tally's ports.
        self.names: HostCache = self.tally.names
        if self.tally.repeats is None:
            self.tally.repeats = Repeats(reactor)
        #: Log lines that repeat, once per window across the tally's ports.
        self.repeats: Repeats = self.tally.repeats

    def intercept(self, request: Request, conn: ProxyServer) -> LocalResponse | None:
        """
        Answer ``request`` locally, or return ``None`` to let it through.
        """
        return None

    def target(self, request: Request, conn: ProxyServer) -> UpstreamTarget:
        """
        Where to send ``request`` (absolute form or CONNECT).

        :raises HTTPError: to refuse it.
        """
        raise NotImplementedError
