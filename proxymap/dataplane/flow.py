"""
Flow control shared by both legs of a proxied connection.

A transport has one pause switch, but several things may want a leg to stop
reading at once: the peer's write buffer is full (backpressure), the client
has pipelined too much while a response is pending, or the upstream is still
connecting.  :class:`Throttled` keeps a set of reasons as bits and touches the
transport only when the set becomes empty or non-empty.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

#: The peer's transport asked us to stop (its write buffer is full).
PEER = 1
#: The client pipelined more than we buffer while a response is pending.
PIPELINE = 2
#: The upstream is still connecting and we hold enough of the request.
CONNECTING = 4

#: Bytes held for a peer (pipelined requests, writes before connect) before
#: we stop reading.
BUFFER_LIMIT = 64 * 1024

#: A connection ended cleanly: the reason :func:`close` and the reactor's
#: quicker closes give (one shared Failure, as Twisted shares its own).
DONE = Failure(ConnectionDone())

#: The transports :func:`send` may write straight to the socket of.
_PLAIN_TCP: tuple[type, ...] = (tcp.Server, tcp.Client)


#: Every attribute Twisted (24-26) sets on a TCP transport in its life
#: (construction, connecting, writing, producers, closing and
#: half-closing): those of both kinds, then those only an accepted
#: connection (a server's) or only an outgoing one (a client's) gets.
_TRANSPORT_ATTRIBUTES = (
    "_aborting",
    "_tempDataBuffer",
    "_tempDataLen",
    "_writeDisconnected",
    "_writeDisconnecting",
    "connected",
    "dataBuffer",
    "disconnected",
    "disconnecting",
    "doRead",
    "doWrite",
    "fileno",
    "logstr",
    "offset",
    "producer",
    "producerPaused",
    "protocol",
    "reactor",
    "socket",
    "streamingProducer",
)
_SERVER_ATTRIBUTES = ("client", "hostname", "repstr", "server", "sessionno")
_CLIENT_ATTRIBUTES = ("_requiresResolution", "addr", "connector", "realAddress")


def _teach_layouts() -> None:
    """
    Show CPython every attribute a TCP transport will get, once, before the
    first real transport exists.

    CPython (3.11+) keeps instance attributes in a layout shared by the
    class, learnt from its first few dozen instances; an attribute first set
    after that gives each instance a private dict instead (about 800 bytes).
    Under load hundreds of transports exist before the first of them
    connects or registers a producer, so the attributes Twisted sets then
    (``doWrite``, ``realAddress``, ``producer``...) came too late and every
    connection paid for two dicts.  A throwaway instance, never initialised
    and never seen by Twisted, sets them all first.  Only the memory layout
    changes; where the layout is already settled (or on another Python) this
    does nothing.

    The layout holds 29 names.  From 3.14 on, CPython starts a class's
    layout with the names its own methods assign (``__static_attributes__``:
    for a server, ``_addressType`` as well, set only for IPv6), so each kind
    is shown only its own names: shown a client's as well, a server's
    layout ran one over, and every accepted connection had its dict again.
    """
    for cls in _PLAIN_TCP:
        _teach_layout(cls)


def _teach_layout(cls: type) -> None:
    own = _SERVER_ATTRIBUTES if issubclass(cls, tcp.Server) else _CLIENT_ATTRIBUTES
    dummy: object = object.__new__(cls)
    for name in _TRANSPORT_ATTRIBUTES + own:
        object.__setattr__(dummy, name, None)


_teach_layouts()


def plain_tcp(cls: type) -> None:
    """
    Treat ``cls``, a subclass of Twisted's TCP transport that changes nothing
    :func:`send` relies on, as plain TCP: :func:`send` writes straight to its
    socket and its instances share one attribute layout.  (``send`` checks
    the exact type, so subclasses are not plain until they say so.)
    """
    global _PLAIN_TCP
    if cls not in _PLAIN_TCP:
        _teach_layout(cls)
        _PLAIN_TCP = (*_PLAIN_TCP, cls)


def _nothing_queued(transport: Any) -> bool:
    """
    Whether ``transport`` is plain TCP in its ordinary state, open, with
    nothing queued to write: what it is asked to do now may be done on its
    socket at once.
    """
    return (
        type(transport) in _PLAIN_TCP
        and transport.connected
        and not transport._tempDataLen
        and not transport.dataBuffer
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport.TLS
    )


def send(transport: Any, data: bytes, last: bool = False) -> None:
    """
    Write ``data`` to ``transport`` now if it can take all of it, else as
    ``transport.write`` does.

    ``transport.write`` never sends: it queues the bytes, asks the reactor to
    watch the socket for writability, and sends on the next turn of the loop,
    then stops watching.  That is two ``epoll_ctl`` calls and one more
    dispatch per write, for every request head and every response.  When
    nothing is queued ahead of ``data`` (the usual case: the kernel's send
    buffer has room), sending at once gives the peer the same bytes in the
    same order, sooner, and the transport never learns it had work.  Anything
    the socket does not take, and any error, goes through ``transport.write``,
    so partial writes, backpressure (producers are paused by the transport's
    own buffer) and failures are handled by Twisted as before.

    ``last``: these are the last bytes of ``transport``, whose caller closes
    it next.  When the socket takes all of them at once, its write side is
    shut at once too, so that the FIN travels in the same segment as the
    data (sent with ``MSG_MORE``, the kernel holds it for the ``shutdown``).
    Otherwise the FIN would follow a loop turn later, when Twisted closes
    the socket: a second segment through the network stack and, on
    loopback, a second wake-up of the peer, for every response that ends a
    connection.  The transport is then marked write-closed, as Twisted
    marks it after its own ``loseWriteConnection``: later writes are
    dropped, and the caller's ``loseConnection`` closes at once (stop
    reading, close the socket, tell the protocol the connection is done)
    instead of watching for writability first to flush an empty buffer.
    The protocol's ``connectionLost`` therefore runs inside that
    ``loseConnection`` call, as Twisted already does for a half-closed
    transport.  After a partial send or an error the caller's
    ``loseConnection`` closes as usual.

    Only plain TCP transports in their ordinary state qualify; anything else
    (TLS, closing, test doubles) is simply ``transport.write``.
    """
    if _nothing_queued(transport):
        skt = transport.socket
        try:
            sent = skt.send(data, _MSG_MORE if last else 0)
        except OSError:
            # Would block, or an error: doWrite meets it again and reports it.
            sent = 0
        if sent == len(data):
            if last:
                try:
                    skt.shutdown(socket.SHUT_WR)
                except OSError:
                    # Reset meanwhile: Twisted's close meets it and reports it.
                    return
                transport._writeDisconnected = True
            return
        data = data[sent:]
    transport.write(data)


#: A kept connection parked this long (seconds) may have been idle long
#: enough to leave the kernel's interactive mode; taking it again calls
#: :func:`interactive`.  The kernel's own bound is its delayed-ACK timeout,
#: 40 ms at least, counted in jiffies (up to 10 ms each) from the last
#: segment in: 30 ms stays clear of it.
INTERACTIVE_GAP = 0.03

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

#: PyPy's socket module lacks ``MSG_MORE``; Linux's value is fixed (0x8000),
#: and on a system without the flag :func:`send` asks for nothing more.
_MSG_MORE = getattr(socket, "MSG_MORE", 0x8000 if sys.platform == "linux" else 0)


def interactive(transport: Any) -> None:
    """
    Let the kernel delay the ACK of what ``transport`` receives next, as it
    does by itself for a connection in request/response use.

    Linux treats a TCP connection as interactive ("pingpong" mode) when it
    sends data within the delayed-ACK timeout (40 ms at least) of the data
    it last received: an answer is under way, so the ACK of what comes back
    can wait, to ride on the next bytes out or to go with the kernel's
    delayed-ACK timer.  A kept upstream connection taken again after a
    longer idle spell does not look interactive, since its request follows
    nothing recent, and the response to it is ACKed at once, as proxymap
    reads it: a segment sent (and, over loopback, received by the peer)
    inside proxymap's ``recv``, a network software interrupt of its own
    for every request.  In interactive mode the ACK waits instead; the
    timer sends it with the other connections' due ACKs, dozens to an
    interrupt.  Over 1000 ports (bench/RESULTS.rst, "Delayed ACKs") that took
    proxymap's core from 3.0 to 2.0 network receive interrupts a request
    and its software-interrupt time from 9.8 to 6.2 us a request, what one
    busy port costs (2.0 and 6.0).  The vendor sees the delayed ACK every
    busy connection already gives it.

    ``TCP_QUICKACK`` set to 0 is the kernel's switch into that mode, for
    the coming exchange (the delayed-ACK timer, when it fires, switches
    back).  It exists on Linux only; elsewhere, and for a transport without
    a socket, this does nothing.
    """
    handle = getattr(transport, "getHandle", None)
    if _QUICKACK is None or handle is None:
        return
    skt = handle()
    if isinstance(skt, socket.socket):
        try:
            skt.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 0)
        except OSError:
            # Closed or reset meanwhile: the next read or write reports it.
            pass


def close_write(transport: Any) -> None:
    """
    ``transport.loseWriteConnection()``, done at once when nothing is queued.

    Twisted queues a half-close behind the write buffer: it watches the
    socket for writability, and on the next turn finds the buffer empty,
    stops watching, shuts the write side and tells the protocol
    (``writeConnectionLost``).  With nothing queued those are the same
    steps, done now by Twisted's own ``_closeWriteConnection``, without the
    two ``epoll_ctl`` and the turn; every tunnel ends with one on each leg.
    The protocol's ``writeConnectionLost`` therefore runs inside this call.

    A TLS transport (an ``https://`` upstream's) is left open both ways:
    Twisted's TLS has no half-close, and its ``loseWriteConnection`` would
    shut the socket under the TLS layer, without a ``close_notify`` and
    ahead of what TLS still holds.  Such a tunnel ends when the gateway
    closes, or the client closes it whole.
    """
    if getattr(transport, "TLS", False):
        return
    if _nothing_queued(transport):
        transport._writeDisconnecting = True
        transport._writeDisconnected = True
        transport._closeWriteConnection()
        return
    transport.loseWriteConnection()


def close(transport: Any) -> None:
    """
    ``transport.loseConnection()``, done at once when nothing is queued.

    Twisted closes a connection only once it has flushed its write buffer,
    even an empty one: it stops watching the socket for reading and starts
    watching it for writing (two ``epoll_ctl``), and on the next turn sends
    zero bytes, stops watching (a third) and closes.  With nothing queued
    and no producer to wait for (none, or a streaming one not paused: one
    Twisted would not resume first), the close is done now by the
    transport's own ``connectionLost``, with the same reason (the
    connection is done; the producer is told to stop, as Twisted tells it).
    The protocol's ``connectionLost`` therefore runs inside this call, as
    it does after a peer's reset: callers use this where the peer has just
    ended its side, from the reactor's own call, and nothing of theirs
    follows the close.
    """
    if _nothing_queued(transport) and (
        transport.producer is None or (transport.streamingProducer and not transport.producerPaused)
    ):
        transport.connectionLost(DONE)
        return
    transport.loseConnection()


@implementer(IPushProducer)
class Throttled(Protocol):
    """
    A protocol that is the push producer for its peer's transport.

    Both legs of every connection are instances of subclasses, so they keep
    their attributes in slots: with over thirty of them, an instance dict
    would not share keys and costs several hundred bytes more per idle tunnel.
    """

    __slots__ = ("_paused", "_read_closed", "_write_closed", "connected", "factory", "transport")

    def __init__(self) -> None:
        self.transport = None
        self.connected = 0
        self.factory = None
        self._paused = 0
        self._read_closed = False
        self._write_closed = False

    def pause_reading(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self._paused |= reason

    def resume_reading(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # IPushProducer, called by the peer's transport.
    def pauseProducing(self) -> None:
        self.pause_reading(PEER)

    def resumeProducing(self) -> None:
        self.resume_reading(PEER)

    def stopProducing(self) -> None:
        """
        The peer's transport is gone; our connectionLost handling follows from it.
        """

    # IHalfCloseableProtocol: once both halves are closed, so is the connection.
    def writeConnectionLost(self) -> None:
        self._write_closed = True
        if self._read_closed:
            self.transport.loseConnection()  # type: ignore[union-attr]
