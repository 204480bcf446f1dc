"""
The upstream leg: a connection to the vendor's gateway (or, for the sandbox
vendor, to the origin), owned by one client connection.

It carries one request at a time and frames each response so the client leg
knows when the next pipelined request may go; or, after a CONNECT handshake,
it is one half of a tunnel.  Response bodies are written to the client as
they arrive, never collected.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from twisted.internet import error
from twisted.internet.interfaces import IAddress, IConnector, IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from proxymap.config import bracketed
from proxymap.dataplane import flow, gatewaytls
from proxymap.dataplane.http import (
    MAX_HEAD_SIZE,
    TUNNEL_OPEN,
    ChunkedFramer,
    HTTPError,
    LengthFramer,
    Request,
    Response,
    UntilCloseFramer,
    build_head,
    parse_response_head,
)
from proxymap.dataplane.socks import is_ip_address

if TYPE_CHECKING:
    from proxymap.dataplane.pool import UpstreamPool
    from proxymap.dataplane.server import ProxyServer, UpstreamTarget

log = Logger()

VENDOR_REJECTED = (
    "the upstream proxy rejected this session's credentials (407); "
    "check the mapping's user, pass and username template"
)


class _Connector(ClientFactory):
    """
    Builds exactly one :class:`UpstreamProtocol` and reports connect failures to it.
    """

    # One per upstream connection: slots, not a dict (Factory.doStart sets numPorts).
    __slots__ = ("numPorts", "proto")
    noisy = False

    def __init__(self, proto: UpstreamProtocol) -> None:
        self.proto = proto
        self.numPorts = 0

    def buildProtocol(self, addr: IAddress | None) -> UpstreamProtocol:
        return self.proto

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.proto.connect_failed(reason)


@implementer(IHalfCloseableProtocol)
class UpstreamProtocol(flow.Throttled):
    """
    One upstream connection of one client connection.
    """

    __slots__ = (
        "_buffer",
        "_decode",
        "_framer",
        "_head",
        "_lost",
        "_pending",
        "_pending_size",
        "_pool",
        "_ready",
        "_request",
        "_retry_head",
        "_reusable",
        "_socks_state",
        "_tunnel",
        "_tunnel_request",
        "connect_deadline",
        "connected_at",
        "connector",
        "key",
        "parked_at",
        "served",
        "server",
        "started",
        "target",
    )

    def __init__(
        self, server: ProxyServer, target: UpstreamTarget, tunnel: Request | None = None
    ) -> None:
        super().__init__()
        self.server = server
        self.target = target
        self.key = target.key
        #: When the connection was made (0 until then).
        self.connected_at = 0.0
        #: True once any byte of the current final response went to the
        #: client (an interim 1xx before it does not count).
        self.started = False
        self.connector: IConnector | None = None
        #: When connecting gives up (the client leg's timer watches it).
        self.connect_deadline = 0.0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._tunnel_request = tunnel
        self._tunnel = False
        self._request: Request | None = None
        self._buffer = b""
        self._framer: LengthFramer | ChunkedFramer | UntilCloseFramer | None = None
        self._decode = False
        #: A response head waiting to go out with the first body bytes.
        self._head = b""
        self._reusable = True
        self._lost = False
        #: True once bytes may go to the peer (after any SOCKS handshake).
        self._ready = False
        #: The SOCKS5 client handshake's state, while it runs.
        self._socks_state = ""
        #: Responses completed over this connection.
        self.served = 0
        #: The head of the request in flight, while sending it again on a
        #: fresh connection would be safe (see connectionLost); else b"".
        self._retry_head = b""
        #: The pool this connection is parked in (None: in use).
        self._pool: UpstreamPool | None = None
        #: When the connection was last parked (0: never).
        self.parked_at = 0.0

    @classmethod
    def connect(
        cls, server: ProxyServer, target: UpstreamTarget, tunnel: Request | None = None
    ) -> UpstreamProtocol:
        proto = cls(server, target, tunnel)
        if tunnel is not None:
            proto._request = tunnel
        factory = server.factory
        # The deadline covers looking the gateway's name up, if it must wait.
        proto.connect_deadline = server.seconds() + factory.connect_timeout
        server.wake_by(proto.connect_deadline)
        names = factory.names
        address = names.address(target.host)
        if address is not None:
            proto._dial(address)
        else:
            names.lookup(target.host).addCallbacks(proto._resolved, proto.connect_failed)
        return proto

    def _dial(self, address: str) -> None:
        # No timeout for Twisted to schedule (None, not its default of 30 s):
        # the client leg's own timer enforces it (see connect_timed_out).
        # A DelayedCall per upstream connection, cancelled on connect but
        # kept in the reactor's heap until the heap is next compacted, cost
        # time on every connection and about 150 bytes on every held tunnel.
        self.connector = self.server.factory.reactor.connectTCP(
            address, self.target.port, _Connector(self), timeout=None
        )

    def _resolved(self, address: str) -> None:
        if not self._lost:  # else closed or timed out while looking up
            self._dial(address)

    @property
    def connecting(self) -> bool:
        return self.transport is None and not self._lost

    @property
    def address(self) -> str:
        return f"{bracketed(self.target.host)}:{self.target.port}"

    # ------------------------------------------------------------ used by the client leg

    def reusable_for(self, target: UpstreamTarget) -> bool:
        return (
            self._reusable
            and not self._lost
            and self._request is None
            and self._tunnel_request is None
            and self.key == target.key
        )

    def send_request(self, request: Request, head: bytes) -> None:
        self._request = request
        self.started = False
        # Only a connection that served before can turn out stale: a fresh
        # one that fails is the upstream's answer, not a race with its close.
        self._retry_head = head if self.served and request.retryable else b""
        self.send(head)

    @property
    def idle(self) -> bool:
        """
        Whether this connection may be parked for another client connection:
        open, between requests, nothing buffered either way.
        """
        transport = self.transport
        return (
            self._ready
            and self._reusable
            and not self._lost
            and not self._read_closed
            and self._request is None
            and self._tunnel_request is None
            and not self._tunnel
            and self._framer is None
            and not self._buffer
            and not self._pending
            and transport is not None
            and not transport.disconnecting  # type: ignore[attr-defined]
        )

    def park(self, pool: UpstreamPool) -> None:
        """
        Leave the client leg that used this connection (see pool.py).

        A parked connection has no ``server`` until :meth:`adopt` gives it
        one: what it hears while parked (a close, bytes nobody asked for)
        concerns only the pool.  Holding on to the finished leg instead
        kept its closed transport, socket object and last request alive
        for as long as the connection stayed parked: about 1.2 KiB per
        parked connection, and over many ports freed long after it was
        made, cold.
        """
        self._pool = pool
        transport = self.transport
        assert transport is not None
        # Neither leg throttles the other any more.
        if transport.producer is not None:  # type: ignore[attr-defined]
            transport.unregisterProducer()  # type: ignore[attr-defined]
        client = self.server.transport
        if client is not None and getattr(client, "producer", None) is self:
            client.unregisterProducer()  # type: ignore[attr-defined]
        if self._paused:
            self._paused = 0
            transport.resumeProducing()  # type: ignore[attr-defined]
        del self.server

    def adopt(self, server: ProxyServer) -> None:
        """
        Serve ``server``, a client leg of the same session, after being parked.

        A connection parked for a while asks the kernel to treat the coming
        exchange as interactive (see :func:`flow.interactive`).
        """
        self._pool = None
        self.server = server
        self.started = False
        server.upstream_connected(self)
        if server.seconds() - self.parked_at >= flow.INTERACTIVE_GAP:
            flow.interactive(self.transport)

    def send(self, data: bytes) -> None:
        if self._ready:
            flow.send(self.transport, data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > flow.BUFFER_LIMIT:
            self.server.pause_reading(flow.CONNECTING)

    def deliver(self, data: bytes, last: bool = False) -> None:
        """
        Write bytes that came from upstream to the client, counting them;
        ``last``: the client connection closes right after them.
        """
        server = self.server
        n = len(data)
        server.bytes_down += n
        server.writes += 1
        server.last_activity = server.seconds()
        session = server.session
        if session is not None:
            session.bytes_down += n
        flow.send(server.transport, data, last)

    def close(self) -> None:
        """
        Close after pending writes, or stop connecting.
        """
        self._reusable = False
        if self.transport is not None:
            self.transport.loseConnection()
        else:
            self._stop_connecting()

    def abort(self) -> None:
        self._reusable = False
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        else:
            self._stop_connecting()

    def _stop_connecting(self) -> None:
        """
        Give up connecting (or looking the gateway's name up): the failure
        that stopping reports, and any address found later, are ignored.
        """
        if self._lost:
            return
        self._lost = True
        if self.connector is not None:
            self.connector.stopConnecting()

    # ------------------------------------------------------------ connection events

    def connect_failed(self, reason: Failure) -> None:
        if self._lost:  # we stopped connecting ourselves
            return
        self._lost = True
        peer = self.target.peer
        if reason.check(error.TimeoutError):
            status, message = 504, f"timed out connecting to the {peer} {self.address}"
        elif reason.check(error.DNSLookupError):
            status, message = 502, f"cannot look up the {peer} host {self.target.host}"
        else:
            status, message = 502, f"cannot connect to the {peer} {self.address}"
        self._log_failure(message, reason)
        server = self.server
        server.upstream_failed(self, status, message)
        server.upstream_gone(self, clean=False)

    def connect_timed_out(self) -> None:
        """
        The connect deadline passed while connecting: give up, as Twisted's
        own connect timeout would have.  connect_failed marks us lost, so
        nothing on the way stops the connector before we do, and the failure
        stopping reports is ignored.
        """
        self.connect_failed(Failure(error.TimeoutError()))
        if self.connector is not None:  # else still looking the name up
            self.connector.stopConnecting()

    def connectionMade(self) -> None:
        server = self.server
        self.connected_at = server.factory.reactor.seconds()
        self.connect_deadline = 0.0  # not a float kept per tunnel
        if server._gone:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if self.target.tls is not None:
            # What is written from here on waits for the handshake.
            self.transport.startTLS(self.target.tls)  # type: ignore[union-attr]
        server.upstream_connected(self)
        if self.target.socks is not None:
            self._socks_begin()
            return
        self._connected_ready()

    def _connected_ready(self) -> None:
        """
        The peer is ready for the request (or the CONNECT handshake).
        """
        server = self.server
        tunnel = self._tunnel_request
        target = self.target
        self._ready = True
        if tunnel is not None and target.socks is not None:
            self._start_tunnel(TUNNEL_OPEN, b"")
        elif tunnel is not None:
            if target.via_proxy:
                extra = [b"Host: " + tunnel.target]
                if target.authorization is not None:
                    extra.append(b"Proxy-Authorization: " + target.authorization)
                flow.send(
                    self.transport,
                    build_head(b"CONNECT " + tunnel.target + b" HTTP/1.1", [], extra),
                )
            else:
                self._start_tunnel(TUNNEL_OPEN, b"")
        if self._pending:
            flow.send(self.transport, b"".join(self._pending))
            self._pending.clear()
            self._pending_size = 0
        server.resume_reading(flow.CONNECTING)

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel:
            self.deliver(data)
            return
        if self._socks_state:
            self._socks_data(data)
            return
        if self._framer is not None:
            self._feed(data)
            return
        if self._request is None:
            # Bytes nobody asked for (a vendor's 408 as it drops an idle
            # connection, say): this connection cannot be trusted again.
            self._reusable = False
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._buffer += data
        self._parse()

    def _parse(self) -> None:
        server = self.server
        while self._request is not None and self._framer is None and not self._tunnel:
            buf = self._buffer
            end = buf.find(b"\r\n\r\n")
            if end == -1:
                if len(buf) > MAX_HEAD_SIZE:
                    self._give_up(502, "the upstream sent an oversized response head")
                elif b"\n\n" in buf or b"\n\r\n" in buf:
                    # A head ended by bare LFs would never end: a 502 now,
                    # not a 504 at the idle timeout.
                    self._give_up(502, "the upstream's response head lines do not end in CRLF")
                return
            self._buffer = buf[end + 4 :]
            request = self._request
            try:
                response = parse_response_head(buf[:end], request.method)
            except HTTPError as e:
                self._give_up(e.status, e.message)
                return
            status = response.status
            if status == 407:
                self._log(
                    LogLevel.warn,
                    ("rejected", self.address),
                    "upstream {upstream} rejected the credentials of session {session}",
                    upstream=self.address,
                    session=server.session.id if server.session else None,
                )
                self._give_up(502, VENDOR_REJECTED)
                return
            if request.method == b"CONNECT":
                if 200 <= status < 300:
                    early, self._buffer = self._buffer, b""
                    answer = build_head(b"HTTP/1.1 %d %s" % (status, response.reason), [])
                    self._start_tunnel(answer, early)
                else:
                    reason = response.reason.decode("latin-1")
                    self._give_up(status, f"the upstream refused the tunnel: {status} {reason}")
                return
            if status < 200:
                if status == 101:
                    self._switch(request, response)
                    return
                if request.version == b"HTTP/1.1":
                    # Not ``started``: a final answer, proxymap's own 502 or
                    # 504 included, may still follow an interim one.  But the
                    # client has seen part of this exchange: no sending again.
                    self._retry_head = b""
                    self.deliver(
                        build_head(b"HTTP/1.1 %d %s" % (status, response.reason), response.lines)
                    )
                continue
            self._respond(request, response)
            if self._framer is not None and self._buffer:
                rest, self._buffer = self._buffer, b""
                self._feed(rest)
            if self._head:
                self._flush_head()

    def _switch(self, request: Request, response: Response) -> None:
        """
        The upstream switched protocols (101): if the client asked for it,
        pass the 101 on and carry the bytes of both legs from here on, as a
        CONNECT tunnel does; this connection serves no one else.
        """
        if request.upgrade is None:
            self._give_up(502, "the upstream switched protocols unasked")
            return
        if not response.upgrade:
            self._give_up(502, "the upstream switched protocols without naming one")
            return
        self._reusable = False
        self.started = True
        answer = build_head(
            b"HTTP/1.1 101 " + (response.reason or b"Switching Protocols"),
            response.lines,
            [b"Connection: Upgrade", b"Upgrade: " + response.upgrade],
        )
        # Delivered, not written by tunnel_ready: the head is the upstream's
        # and counts as bytes from it, as a response head does.
        self.deliver(answer)
        early, self._buffer = self._buffer, b""
        self._start_tunnel(b"", early)

    def _respond(self, request: Request, response: Response) -> None:
        server = self.server
        lines = response.lines
        decode = response.chunked and request.version == b"HTTP/1.0"
        keep = request.keep_alive and not response.until_close and not decode
        if decode:
            lines = [line for line in lines if line[:18].lower() != b"transfer-encoding:"]
        if not keep:
            server._close_after = True
            extra = [b"Connection: close"]
        elif request.version == b"HTTP/1.0":
            extra = [b"Connection: keep-alive"]
        else:
            extra = []
        self._reusable = response.keep_alive
        self.started = True
        # Held for a moment: the body bytes that came with it go in the same write.
        if response.verbatim is not None and not extra and not decode:
            self._head = response.verbatim + b"\r\n\r\n"
        else:
            self._head = build_head(
                b"HTTP/1.1 %d %s" % (response.status, response.reason), lines, extra
            )
        if response.chunked:
            self._framer = ChunkedFramer(decode=decode)
            self._decode = decode
        elif response.until_close:
            self._framer = UntilCloseFramer()
        else:
            length = response.content_length or 0
            buffered = self._buffer
            if len(buffered) >= length:
                # The whole body came with the head (the usual small response):
                # one write, no framer.
                head, self._head = self._head, b""
                # Its close follows in response_done (see _finish_request).
                last = server._close_after
                if len(buffered) > length:
                    self._overran()
                self._buffer = b""
                if length:
                    self.deliver(head + buffered[:length], last)
                else:
                    self.deliver(head, last)
                self._complete()
                return
            self._framer = LengthFramer(length)

    def _feed(self, data: bytes) -> None:
        framer = self._framer
        assert framer is not None
        try:
            n = framer.feed(data)
        except HTTPError:
            self._log(
                LogLevel.info,
                ("malformed body", self.address),
                "upstream {upstream} sent a malformed body",
                upstream=self.address,
            )
            # Nothing more of this response is read, whatever still arrives.
            self._framer = None
            self._request = None
            self._reusable = False
            self.server.abort()
            return
        head, self._head = self._head, b""
        if self._decode:
            assert isinstance(framer, ChunkedFramer)
            if head:
                self.deliver(head)
            for piece in framer.decoded:
                self.deliver(piece)
            framer.decoded.clear()
        elif n:
            # The end of a response its client connection closes after.
            last = framer.done and self.server._close_after
            self.deliver(head + data[:n] if head else data if n == len(data) else data[:n], last)
        elif head:
            self.deliver(head)
        if framer.done:
            if n < len(data):
                self._overran()
            self._complete()

    def _overran(self) -> None:
        """
        The upstream sent bytes beyond the response it framed, in the same
        read as its end.  They answer nothing we asked, and left in the
        buffer they would pass for the answer to the next request sent over
        this connection, another client's perhaps (a response desync).  So
        they are dropped with the connection: it serves no further request
        and closes after the current response (see _complete).
        """
        self._reusable = False
        self._buffer = b""
        self._log(
            LogLevel.info,
            ("overran", self.address),
            "upstream {upstream} sent more than its response; closing that connection",
            upstream=self.address,
        )

    def _flush_head(self) -> None:
        head, self._head = self._head, b""
        self.deliver(head)

    def _complete(self) -> None:
        if self._head:
            self._flush_head()
        self._framer = None
        self._request = None
        self._retry_head = b""
        self._decode = False
        self.served += 1
        if not self._reusable:
            self.transport.loseConnection()  # type: ignore[union-attr]
        self.server.response_done(self)

    # ------------------------------------------------------------ SOCKS5 upstream

    def _socks_begin(self) -> None:
        self._socks_state = "method"
        self._buffer = b""
        self.transport.write(b"\x05\x01\x02")  # type: ignore[union-attr]

    def _socks_data(self, data: bytes) -> None:
        self._buffer += data
        buf = self._buffer
        route = self.target.socks
        assert route is not None
        if self._socks_state == "method":
            if len(buf) < 2:
                return
            self._buffer = buf[2:]
            if buf[:2] != b"\x05\x02":
                self._give_up(502, "the SOCKS5 upstream refused username/password authentication")
                return
            user = route.username.encode()
            password = route.password.encode()
            self._socks_state = "auth"
            self.transport.write(  # type: ignore[union-attr]
                bytes((1, len(user))) + user + bytes((len(password),)) + password
            )
        elif self._socks_state == "auth":
            if len(buf) < 2:
                return
            self._buffer = buf[2:]
            if buf[1] != 0:
                self._log(
                    LogLevel.warn,
                    ("rejected", self.address),
                    "SOCKS5 upstream {upstream} rejected the credentials of session {session}",
                    upstream=self.address,
                    session=self.server.session.id if self.server.session else None,
                )
                self._give_up(502, VENDOR_REJECTED)
                return
            self._socks_state = "resolving"
            if route.resolve_locally and not is_ip_address(route.host):
                # The service's cache of names, as for the gateway's own:
                # a target's address is looked up once a minute, not per
                # connection.
                names = self.server.factory.names
                address = names.address(route.host)
                if address is not None:
                    self._socks_request(address)
                else:
                    names.lookup(route.host).addCallbacks(
                        self._socks_resolved, self._socks_unresolved
                    )
            else:
                self._socks_request(route.host)
        elif self._socks_state == "reply":
            if len(buf) < 5:
                return
            size = {1: 10, 4: 22, 3: 7 + buf[4]}.get(buf[3], 10)
            if len(buf) < size:
                return
            code = buf[1]
            self._buffer = b""
            self._socks_state = ""
            if code != 0:
                status = {2: 403, 6: 504}.get(code, 502)
                self._give_up(status, f"the upstream refused the tunnel: SOCKS5 reply {code}")
                return
            self._connected_ready()
            if buf[size:]:
                self.dataReceived(buf[size:])

    def _socks_request(self, host: str) -> None:
        route = self.target.socks
        assert route is not None
        if is_ip_address(host):
            address = ipaddress.ip_address(host)
            atyp = 1 if address.version == 4 else 4
            dest = bytes((atyp,)) + address.packed
        else:
            name = host.encode("ascii")  # checked ASCII where it came in
            dest = bytes((3, len(name))) + name
        self._socks_state = "reply"
        self.transport.write(  # type: ignore[union-attr]
            b"\x05\x01\x00" + dest + route.port.to_bytes(2, "big")
        )

    def _socks_resolved(self, address: str) -> None:
        if not self._lost:  # else closed while the name was looked up
            self._socks_request(address)

    def _socks_unresolved(self, failure: Failure) -> None:
        if self._lost:
            return
        route = self.target.socks
        assert route is not None
        message = f"cannot look up the target host {route.host}"
        self._log_failure(message, failure)
        self._give_up(502, message)

    def _start_tunnel(self, answer: bytes, early: bytes) -> None:
        self._tunnel = True
        self._request = None
        self._tunnel_request = None
        self.server.tunnel_ready(self, answer, early)

    def _log(self, level: LogLevel, kind: Hashable, format: str, /, **fields: Any) -> None:
        """
        Log a failure that may repeat per request, once per window of its
        ``kind`` across every port (see repeats.py).
        """
        self.server.factory.repeats.emit(log, level, kind, format, **fields)

    def _log_failure(self, message: str, failure: Failure) -> None:
        """
        Log why a connection or lookup failed, once per window of ``message``.
        """
        self._log(
            LogLevel.info,
            message,
            "{message}: {error}",
            message=message,
            error=failure.getErrorMessage(),
        )

    def _give_up(self, status: int, message: str) -> None:
        self._reusable = False
        self.transport.loseConnection()  # type: ignore[union-attr]
        self._request = None
        self.server.upstream_failed(self, status, message)

    # ------------------------------------------------------------ closing

    def readConnectionLost(self) -> None:
        self._read_closed = True
        if self._tunnel:
            flow.close_write(self.server.transport)
            if self._write_closed:
                self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            flow.close(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._reusable = False
        if self._pool is not None:  # closed while parked: no client leg to tell
            self._pool.discard(self)
            self._pool = None
            return
        server = self.server
        clean = bool(reason.check(error.ConnectionDone))
        if isinstance(self._framer, UntilCloseFramer):
            self._framer.done = True
            self._complete()
        elif self._request is not None:
            if self._retry_head and not self.started and not self._buffer:
                # Closed before any byte of an answer: the upstream most
                # likely closed this kept connection as the request went.
                server.upstream_retry(self, self._request, self._retry_head)
            else:
                server.upstream_failed(self, 502, self._lost_message(reason))
        server.upstream_gone(self, clean)

    def _lost_message(self, reason: Failure) -> str:
        """
        Why the connection went before its answer, for the client: a TLS
        handshake the gateway's certificate failed (an https:// upstream),
        or a close.
        """
        tls = self.target.tls is not None
        detail = gatewaytls.failure_detail(reason, self.target.host) if tls else None
        if detail is None:
            return "the upstream closed the connection"
        self._log(
            LogLevel.warn,
            ("tls", self.address, detail),
            "TLS with the upstream {upstream} failed: {detail}",
            upstream=self.address,
            detail=detail,
        )
        return f"TLS with the upstream {self.address} failed: {detail}"
