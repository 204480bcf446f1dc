"""
The reactor proxymap runs on: Twisted's epoll reactor with a leaner event
dispatch.

Twisted's epoll reactor hands every ready descriptor to
``twisted.python.log.callWithLogger``, which asks the descriptor for its log
prefix, copies the legacy logging context dictionary, pushes it, calls
``_doReadOrWrite`` and pops it again.  Under load that wrapper was about a
tenth of proxymap's CPU time (py-spy, CONNECT setups), paid on every read,
write, accept and close.  The context only labels legacy
``twisted.python.log`` messages with a ``system`` prefix; proxymap logs
through ``twisted.logger``, which never reads it.

:class:`LeanEPollReactor` calls ``_doReadOrWrite`` directly and keeps the
wrapper's one other duty: an exception escaping the dispatch (a
``connectionLost`` that raises, say) is logged and the loop goes on with the
next event.  Everything else is the stock reactor.

It also connects to IPv4 literals at once, on a socket created non-blocking
and watched for reading and writing in one ``epoll_ctl`` (see
:class:`_Client`), accepts without Twisted's per-call set-up (see
:class:`_Port`), and closes a connection without first taking its socket
out of the epoll set, which the close does (see :func:`_connection_lost`).

``twist proxymap`` and ``twistd proxymap`` install it unless a reactor was
already chosen (``--reactor=epoll`` before the subcommand picks the stock one);
see :func:`install_unless_chosen`.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import Any

from twisted.internet import error, tcp
from twisted.internet.address import IPv6Address
from twisted.internet.epollreactor import EPOLLIN, EPOLLOUT, EPollReactor
from twisted.internet.error import getConnectError
from twisted.internet.interfaces import IConnector
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxymap.dataplane import flow

log = Logger()


class _ShutOnce:
    """
    A TCP transport that closes without shutting a socket down twice.

    Twisted shuts a socket down (both ways) before closing it.  When the
    write side is shut already (the FIN went with a connection's last bytes,
    :func:`flow.send` with ``last``, or with a half-close), that second ``shutdown``
    does nothing ``close`` would not, and once the peer has closed as well
    it fails with ``ENOTCONN``: a syscall and a caught exception per
    connection.  A property, not an attribute set per connection: a
    transport's attributes are at the limit of CPython's shared layout (see
    ``flow._teach_layouts``).
    """

    _writeDisconnected: bool

    @property
    def _shouldShutdown(self) -> bool:
        return not self._writeDisconnected

    def loseConnection(self) -> None:
        """
        Twisted's ``loseConnection``; with the write side shut already, the
        connection closes at once as Twisted closes it, but without stopping
        reading and writing first: :func:`_connection_lost` forgets the
        socket instead (so does a client's, through its common connection).
        A TLS transport (``startTLS``) closes as Twisted closes it.
        """
        if (
            self._writeDisconnected
            and self.connected  # type: ignore[attr-defined]
            and not self.disconnecting  # type: ignore[attr-defined]
            and not self.TLS  # type: ignore[attr-defined]
        ):
            self.connectionLost(flow.DONE)  # type: ignore[attr-defined]
            return
        super().loseConnection()  # type: ignore[misc]


def _connection_lost(self: Any, reason: Failure) -> None:
    """
    Twisted's ``Connection.connectionLost``, without the ``epoll_ctl`` that
    stops watching a socket about to be closed.

    Twisted stops reading and writing (an ``epoll_ctl`` to delete the
    descriptor, and a walk through the reactor's bookkeeping for each),
    then closes the socket.  Closing the last descriptor of a socket takes
    it out of every epoll set by itself, so here the reactor only forgets
    it (:meth:`LeanEPollReactor.forget`) and the close does the rest: a
    syscall less per connection.  The rest is Twisted's, in its order: the
    producer is stopped first (and may still change what is watched), the
    protocol told last.
    """
    if not hasattr(self, "socket"):  # Twisted's guard against a second call
        return
    self.disconnected = 1
    self.connected = 0
    if self.producer is not None:
        self.producer.stopProducing()
        self.producer = None
    self.reactor.forget(self)
    # reason.check, without its per-Failure class-name list: same answer.
    self._closeSocket(not isinstance(reason.value, error.ConnectionAborted))
    protocol = self.protocol
    del self.protocol
    del self.socket
    del self.fileno
    protocol.connectionLost(reason)


class _Connection(tcp.Connection):
    """
    A connected TCP socket closed by :func:`_connection_lost`: a client's
    connection once connected (``tcp.BaseClient`` hands its ``connectionLost``
    to its ``_commonConnection``).
    """

    connectionLost = _connection_lost


# Twisted only reads _shouldShutdown (a class attribute there): read-only is enough.
class _Server(_ShutOnce, tcp.Server):  # type: ignore[override]
    """
    An accepted TCP connection (see :class:`_ShutOnce`), closed by
    :func:`_connection_lost`.
    """

    connectionLost = _connection_lost

    def __init__(
        self,
        sock: socket.socket,
        protocol: Any,
        client: tuple[Any, ...],
        server: Any,
        sessionno: int,
        reactor: Any,
    ) -> None:
        """
        Twisted's, without formatting this connection's log prefix and
        ``repr`` up front: two strings per connection that only a log line
        or a ``repr`` ever reads, so :meth:`logPrefix` and :meth:`__repr__`
        build them when asked.  (Over 1,000 ports, where every connection's
        work runs on cold caches, the two cost 6-9% of requests per second.)
        """
        tcp.Connection.__init__(self, sock, protocol, reactor)
        if len(client) != 2:
            self._addressType = IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.startReading()
        self.connected = 1

    def logPrefix(self) -> str:
        """
        Twisted's: the protocol's prefix, the session number, the client host.
        """
        protocol = getattr(self, "protocol", None)  # gone once closed
        prefix = "(closed)" if protocol is None else self._getLogPrefix(protocol)
        return f"{prefix},{self.sessionno},{self.hostname}"

    def __repr__(self) -> str:
        """
        Twisted's: the protocol's class, the session number, the port.
        """
        protocol = getattr(self, "protocol", None)
        name = "(closed)" if protocol is None else type(protocol).__name__
        return f"<{name} #{self.sessionno} on {self.server._realPortNumber}>"


flow.plain_tcp(_Server)


class _NonBlockingSocket(socket.socket):
    """
    A socket made non-blocking when created (``SOCK_NONBLOCK``).

    Twisted makes its client sockets non-blocking twice, when it creates one
    and again when the connection wraps it: an ``ioctl`` each, per upstream
    connection.  Created so, the socket already is non-blocking (and Python
    knows: its timeout is 0), so asking for that while it still is changes
    nothing and is not passed on; any other change still is.
    """

    __slots__ = ()

    def setblocking(self, flag: bool) -> None:
        if flag or self.gettimeout() != 0.0:
            super().setblocking(flag)


class _Client(_ShutOnce, tcp.Client):  # type: ignore[override]  # as _Server
    """
    A TCP client that starts connecting to an IPv4 literal at once.

    Twisted's client always starts on the next reactor turn: a ``callLater(0)``
    to ``resolveAddress``, which wraps the literal in a Deferred, then
    ``doConnect``, which asks the fresh socket for a pending error before
    calling ``connect``.  proxymap's upstreams are mostly literals and it
    opens one connection per CONNECT, so that was a DelayedCall, a Deferred
    and a syscall per tunnel.  Here the constructor calls ``connect`` itself.

    Only the expected answer, ``EINPROGRESS``, is handled here (the same
    ``startReading``/``startWriting`` ``doConnect`` does); the connect then
    settles in :meth:`_connect_settled`.  Anything else (an immediate
    failure such as ``ENETUNREACH``) falls back to Twisted's path on the
    next turn, so the failure still reaches the factory asynchronously,
    never inside ``connectTCP``.
    """

    _commonConnection = _Connection

    def createInternetSocket(self) -> socket.socket:
        """
        A new socket, non-blocking from the start (see :class:`_NonBlockingSocket`).
        """
        return _NonBlockingSocket(self.addressFamily, self.socketType | socket.SOCK_NONBLOCK)

    def _finishInit(self, whenDone: Any, skt: Any, error: Any, reactor: Any) -> None:
        if not whenDone or self._requiresResolution or len(self.addr) != 2:
            super()._finishInit(whenDone, skt, error, reactor)
            return
        self._commonConnection.__init__(self, skt, None, reactor)  # type: ignore[arg-type]
        self.realAddress = self.addr
        try:
            result = skt.connect_ex(self.addr)
        except OSError as e:  # connect_ex raises for what is not an errno
            result = e.args[0]
        if result == errno.EINPROGRESS:
            self.doRead = self.doWrite = self._connect_settled  # type: ignore[method-assign]
            reactor.watch_new(self)
        else:
            reactor.callLater(0, whenDone)

    def _connect_settled(self) -> None:
        """
        The connect :meth:`_finishInit` started has succeeded or failed.

        Twisted's ``doConnect`` (which this replaces only for connects
        started here) asks ``SO_ERROR``, then calls ``connect`` once more
        (its own comment: the event itself already says the connect
        succeeded), then stops reading and writing and starts reading again:
        a syscall and two ``epoll_ctl`` per upstream connection that change
        nothing.  Here a connected socket just stops being watched for
        writing; a failure is reported exactly as Twisted reports it.
        """
        if not hasattr(self, "connector"):  # failed already (Twisted's guard)
            return
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.failIfNotConnected(getConnectError((err, os.strerror(err))))
            return
        del self.doRead, self.doWrite
        self.stopWriting()
        self._connectDone()  # starts reading: already does


flow.plain_tcp(_Client)


class _Connector(tcp.Connector):
    def _makeTransport(self) -> tcp.Client:
        return _Client(self.host, self.port, self.bindAddress, self, self.reactor)


class _Port(tcp.Port):
    """
    A listening TCP port that accepts without Twisted's per-call set-up.

    Twisted's ``Port.doRead`` builds, on every call, two ``Logger`` objects
    and a log-buffering context (for the ``EMFILE`` recovery), and a
    generator around ``accept``.  A burst on one port shares that cost; a
    port range shares it with nothing: when clients spread over many ports,
    each call accepts one connection (py-spy and cProfile over 1,000 ports:
    about 1.1 calls per connection, against 0.08 on one port).

    This loop does the same work directly: the same adaptive number of
    accepts per call, IPv6 scope ids, a factory refusing a connection, and
    any exception from the factory or protocol logged without losing the
    port.  One change to the adaptive number: Twisted raises it by 20 after
    every full batch, a batch of one included, so a port that gets one
    connection per wake alternates between a batch of one and a batch of 21
    that ends in ``EAGAIN``: half an ``accept`` and a raised and caught
    ``BlockingIOError`` more per connection (perf, 1,000 ports: 1.50
    ``accept4`` per connection, against 1.07 on one busy port).  Here a
    batch of one grows only when the port was full on the poll before as
    well, that is when connections really queue up; the listener being
    level-triggered, a connection left waiting wakes the next poll anyway.

    Only the expected end of the queue (``EAGAIN``) is handled here;
    every other ``accept`` error (``EMFILE``, ``ENFILE``, ``ENOBUFS``,
    ``EPERM``...) goes to Twisted's own ``doRead``, which tries ``accept``
    again and knows what each of them means.
    """

    transport = _Server
    _full_at = -2  # the reactor's poll count when a batch last came full

    def startListening(self) -> None:
        """
        Twisted's ``startListening`` without its line per port
        ("PortFactory starting on 10201"), as :meth:`_logConnectionLostMsg`
        drops the "(TCP Port 10201 Closed)" line: a range of 1,000 ports
        logged 2,000 lines a run.  proxymap logs one line per mapping
        instead (``ProxymapService.startService``).  No socket to adopt:
        :meth:`LeanEPollReactor.listenTCP` never hands this class one.
        """
        tcp._reservedFD.reserve()  # for the EMFILE recovery, as Twisted does
        skt = None
        try:
            skt = self.createInternetSocket()
            if self.addressFamily == socket.AF_INET6:
                addr = tcp._resolveIPv6(self.interface, self.port)
            else:
                addr = (self.interface, self.port)
            skt.bind(addr)
        except OSError as e:
            if skt is not None:
                skt.close()
            raise error.CannotListenError(self.interface, self.port, e) from None
        skt.listen(self.backlog)
        self._realPortNumber = skt.getsockname()[1]
        self.factory.doStart()  # type: ignore[union-attr]  # always set on a listening port
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]
        self.numberAccepts = 100
        self.startReading()

    def _logConnectionLostMsg(self) -> None:
        pass

    def doRead(self) -> None:
        try:
            accept = self.socket.accept
            build = self.factory.buildProtocol  # type: ignore[union-attr]  # set while listening
            limit = self.numberAccepts
            accepted = 0
            while accepted < limit:
                try:
                    skt, addr = accept()
                except BlockingIOError:
                    break
                except OSError:
                    super().doRead()
                    return
                accepted += 1
                if len(addr) == 4:  # IPv6: keep the scope id, as Twisted does
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = (host[0], *addr[1:])
                protocol = build(self._buildAddr(addr))
                if protocol is None:
                    skt.close()
                    continue
                number = self.sessionno
                self.sessionno = number + 1
                transport = self.transport(skt, protocol, addr, self, number, self.reactor)
                protocol.makeConnection(transport)
            # Twisted's rule: a full batch means more may wait, so take
            # more next time; otherwise as many as came (at least one).
            # But a full batch of one grows only on a second poll in a row.
            if accepted == limit:
                polls = self.reactor.polls  # type: ignore[attr-defined]  # a LeanEPollReactor
                if limit > 1 or self._full_at == polls - 1:
                    self.numberAccepts = limit + 20
                self._full_at = polls
            else:
                self.numberAccepts = max(1, accepted)
        except Exception:
            log.failure("Unhandled error accepting a connection on {port!r}", port=self)


# Transports that close through _connection_lost.
_CLOSING = (_Server, _Client)


class LeanEPollReactor(EPollReactor):
    """
    An epoll reactor that dispatches events without the legacy log context.
    """

    polls = 0
    """
    How many times :meth:`doPoll` has run: :class:`_Port` tells a backlog
    (full on consecutive polls) from one connection per wake by it.
    """

    def doPoll(self, timeout: float | None) -> None:
        """
        Poll for ready descriptors and dispatch each event (see the module).
        """
        self.polls += 1
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        dispatch = self._doReadOrWrite
        selectable_of = self._selectables.get
        for fd, event in events:
            selectable = selectable_of(fd)
            if selectable is None:
                continue  # removed by an earlier event of this batch
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.failure(
                    "Unhandled error dispatching an event to {selectable!r}", selectable=selectable
                )

    doIteration = doPoll

    def _disconnectSelectable(
        self, selectable: Any, why: Any, isRead: bool, *args: Any, **kwargs: Any
    ) -> None:
        """
        Twisted's, but a proxymap connection that read its peer's end is
        told before it stops being watched, not after.

        Twisted unwatches the socket (an ``epoll_ctl``), then calls
        ``readConnectionLost``, after which the protocol often closes the
        connection: the close would have taken the socket out of the epoll
        set by itself (see :func:`_connection_lost`).  Here a connection
        still open after ``readConnectionLost`` (half-closed, or closing on
        a later turn) is unwatched then; one closed meanwhile is not.
        Nothing polls in between, so the order is not seen otherwise.
        """
        if isRead and why.__class__ is error.ConnectionDone and type(selectable) in _CLOSING:
            selectable.readConnectionLost(flow.DONE)
            if selectable.connected:
                self.removeReader(selectable)
            return
        super()._disconnectSelectable(selectable, why, isRead, *args, **kwargs)

    def watch_new(self, selectable: Any) -> None:
        """
        ``addReader`` and ``addWriter`` for a descriptor not watched yet (a
        socket still connecting) in one ``epoll_ctl``, where the two calls
        make two (an add, then a modify).
        """
        fd = selectable.fileno()
        if fd in self._reads or fd in self._writes:  # not new after all
            self.addReader(selectable)
            self.addWriter(selectable)
            return
        self._poller.register(fd, EPOLLIN | EPOLLOUT)
        self._reads.add(fd)
        self._writes.add(fd)
        self._selectables[fd] = selectable

    def forget(self, selectable: Any) -> None:
        """
        Stop watching ``selectable`` without asking epoll: its socket is
        about to be closed, and closing takes it out of the epoll set.

        Only for a socket whose descriptor is its own (never duplicated),
        closed right after: until then, nothing it does reaches the reactor.
        """
        fd = selectable.fileno()
        self._reads.discard(fd)
        self._writes.discard(fd)
        self._selectables.pop(fd, None)

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> tcp.Port:
        """
        Twisted's ``listenTCP``, with :class:`_Port` as the listening port.
        """
        listening = _Port(port, factory, backlog, interface, self)
        listening.startListening()
        return listening

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory[Any],
        timeout: float | None = 30.0,
        bindAddress: Any = None,
    ) -> IConnector:
        """
        Twisted's ``connectTCP``, with :class:`_Client` as the transport.
        """
        # None (no timeout) works though Connector's annotation says float.
        connector = _Connector(host, port, factory, timeout, bindAddress, self)  # type: ignore[arg-type]
        connector.connect()
        return connector


def install() -> None:
    """
    Install :class:`LeanEPollReactor` as the global reactor.
    """
    from twisted.internet.main import installReactor

    installReactor(LeanEPollReactor())


def install_unless_chosen() -> None:
    """
    Install :class:`LeanEPollReactor` unless a reactor is already installed
    (chosen with ``--reactor``, or imported by whoever runs us).

    Called while ``twist``/``twistd`` parse proxymap's options: both install
    a reactor chosen with ``--reactor`` while parsing, before proxymap's
    options, and the default one only after, so a choice is always respected.
    """
    if "twisted.internet.reactor" not in sys.modules:
        install()
