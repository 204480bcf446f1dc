"""
flow.send: bytes go to the socket at once when nothing is queued ahead of
them, and through the transport's own buffer otherwise; flow.send with last: the
same, with the FIN in the same segment; flow.close_write: a half-close at
once when nothing is queued; flow.close: a close at once when nothing is
queued and no producer waits; flow.interactive: the kernel delays the next
ACK.

These use a real tcp.Server over a socketpair (so the bytes really cross a
socket) driven by a MemoryReactor (so nothing runs by itself).
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest
from twisted.internet import error, main, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from proxymap.dataplane import flow

from .helpers import delays_acks


class Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        self.stopped = True

    stopped = False


@pytest.fixture
def pair() -> Iterator[tuple[tcp.Server, socket.socket, MemoryReactor]]:
    ours, peer = socket.socketpair()
    reactor = MemoryReactor()
    transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), None, 1, reactor)  # type: ignore[arg-type]
    peer.setblocking(False)
    yield transport, peer, reactor
    ours.close()
    peer.close()


def received(peer: socket.socket) -> bytes:
    chunks = []
    for _ in range(10_000):
        try:
            chunk = peer.recv(65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def drained(transport: tcp.Server, peer: socket.socket, reactor: MemoryReactor) -> bytes:
    """
    Turn the transport's writes by hand until it stops watching for
    writability; what the peer received meanwhile.
    """
    got = []
    for _ in range(10_000):
        if transport not in reactor.getWriters():
            break
        transport.doWrite()
        got.append(received(peer))
    return b"".join(got)


def test_idle_transport_sends_at_once(
    pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    With nothing queued, the bytes are on the socket when send returns, and
    the reactor was never asked to watch for writability.
    """
    transport, peer, reactor = pair
    flow.send(transport, b"GET / HTTP/1.1\r\n\r\n")
    assert received(peer) == b"GET / HTTP/1.1\r\n\r\n"
    assert transport not in reactor.getWriters()
    assert transport._tempDataLen == 0 and transport.dataBuffer == b""


def test_queued_bytes_keep_their_order(
    pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    Bytes queued by transport.write go first: send queues behind them.
    """
    transport, peer, _ = pair
    transport.write(b"first ")
    flow.send(transport, b"second")
    assert received(peer) == b""
    transport.doWrite()
    assert received(peer) == b"first second"


def test_what_the_socket_does_not_take_is_queued(
    pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    A write larger than the socket takes: the rest waits in the transport,
    which pauses its producer (backpressure) and delivers it all in order.
    """
    transport, peer, reactor = pair
    producer = Producer()
    transport.registerProducer(producer, True)
    data = bytes(range(256)) * (16 * 1024)  # 4 MiB: more than any socket buffer here
    flow.send(transport, data)
    queued = transport._tempDataLen
    assert 0 < queued < len(data)
    assert transport in reactor.getWriters()
    assert producer.paused == 1
    first = received(peer)
    assert len(first) == len(data) - queued
    assert first + drained(transport, peer, reactor) == data
    assert producer.resumed == 1


def test_errors_are_left_to_the_transport(
    pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    A socket error is not raised to the caller: the bytes are queued and the
    transport's next write attempt reports the connection lost.
    """
    transport, peer, _ = pair
    peer.close()
    flow.send(transport, b"into the void")
    assert transport._tempDataLen == len(b"into the void")
    assert transport.doWrite() is main.CONNECTION_LOST


def test_closing_transport_is_not_bypassed(
    pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    Once the transport is closing, writes go through it (it decides what
    still goes out before the close).
    """
    transport, peer, _ = pair
    transport.loseConnection()
    flow.send(transport, b"late")
    assert received(peer) == b""
    assert transport._tempDataLen == 4
    transport.connectionLost(Failure(main.CONNECTION_DONE))


def test_other_transports_get_write() -> None:
    """
    A transport that is not plain TCP (here a test double) gets write().
    """
    transport = StringTransport()
    flow.send(transport, b"hello")
    assert transport.value() == b"hello"


@pytest.fixture
def tcp_pair() -> Iterator[tuple[tcp.Server, socket.socket, MemoryReactor]]:
    """
    As ``pair``, over a real TCP connection on loopback (segments and FINs
    exist only there).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    peer = socket.create_connection(listener.getsockname(), timeout=5)
    ours, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    peer.setblocking(False)
    reactor = MemoryReactor()
    transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), None, 1, reactor)  # type: ignore[arg-type]
    yield transport, peer, reactor
    ours.close()
    peer.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="Linux only")
def test_interactive_asks_the_kernel_to_delay_acks(
    tcp_pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    transport, _peer, _reactor = tcp_pair
    assert not delays_acks(transport.socket)
    flow.interactive(transport)
    assert delays_acks(transport.socket)


def test_interactive_without_a_socket_does_nothing(
    tcp_pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    A transport with no socket (a test double) and a socket already closed
    are both left alone, without an error.
    """
    flow.interactive(StringTransport())
    transport, _peer, _reactor = tcp_pair
    transport.socket.close()
    flow.interactive(transport)


def segments_out(skt: socket.socket) -> int:
    """
    How many segments ``skt`` has sent (``tcpi_segs_out`` of Linux's
    ``struct tcp_info``, at byte 136 since Linux 4.2).
    """
    info = skt.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, 136)[0])


def at_eof(peer: socket.socket) -> bool:
    try:
        return peer.recv(1) == b""
    except BlockingIOError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's tcp_info")
def test_last_bytes_carry_the_fin(
    tcp_pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    send with last puts the bytes and the FIN on the wire before it returns, in
    one segment, without the reactor.
    """
    transport, peer, reactor = tcp_pair
    before = segments_out(transport.socket)
    flow.send(transport, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", last=True)
    assert segments_out(transport.socket) - before == 1
    assert received(peer) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert at_eof(peer)
    assert transport not in reactor.getWriters()
    # The caller's close is done at once, and says the connection ended
    # cleanly: nothing was left to flush.
    lost: list[Failure] = []
    transport.protocol.connectionLost = lost.append  # type: ignore[method-assign]
    transport.loseConnection()
    assert len(lost) == 1 and lost[0].check(main.CONNECTION_DONE.__class__)
    assert transport not in reactor.getReaders() and transport not in reactor.getWriters()
    # Anything written after it goes nowhere.
    transport.write(b"late")
    flow.send(transport, b"later")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's tcp_info")
def test_bytes_that_are_not_last_are_not_held(
    tcp_pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    An ordinary write leaves at once (``MSG_MORE`` would hold a small one
    in the kernel), and the connection stays open.
    """
    transport, peer, _ = tcp_pair
    before = segments_out(transport.socket)
    flow.send(transport, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert segments_out(transport.socket) - before == 1
    assert received(peer) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert not at_eof(peer)


def test_last_bytes_the_socket_does_not_take_are_queued(
    tcp_pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    What the socket does not take waits in the transport, and nothing is
    shut early: every byte arrives, and the FIN only with the caller's close.
    """
    transport, peer, reactor = tcp_pair
    data = bytes(range(256)) * (16 * 1024)  # 4 MiB: more than any socket buffer here
    flow.send(transport, data, last=True)
    assert 0 < transport._tempDataLen < len(data)
    assert received(peer) + drained(transport, peer, reactor) == data
    assert not at_eof(peer)


def test_last_bytes_to_other_transports_are_written() -> None:
    """
    A transport that is not plain TCP gets write() (its caller closes it).
    """
    transport = StringTransport()
    flow.send(transport, b"hello", last=True)
    assert transport.value() == b"hello"
    assert not transport.disconnecting


@implementer(IHalfCloseableProtocol)
class HalfCloseable(Protocol):
    def __init__(self) -> None:
        self.events: list[object] = []

    def dataReceived(self, data: bytes) -> None:
        self.events.append(data)

    def readConnectionLost(self) -> None:
        self.events.append("read closed")

    def writeConnectionLost(self) -> None:
        self.events.append("write closed")


def test_half_close_with_nothing_queued_is_done_at_once(
    tcp_pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    close_write shuts the write side before it returns and tells the
    protocol, without the reactor; the read side stays open.
    """
    transport, peer, reactor = tcp_pair
    protocol = HalfCloseable()
    transport.protocol = protocol
    flow.close_write(transport)
    assert at_eof(peer)
    assert protocol.events == ["write closed"]
    assert transport not in reactor.getWriters()
    assert transport in reactor.getReaders()
    peer.sendall(b"still heard")
    transport.doRead()
    assert protocol.events == ["write closed", b"still heard"]
    # Writes after it go nowhere; closing is immediate, as after Twisted's own.
    flow.send(transport, b"late")
    transport.loseConnection()
    assert received(peer) == b""
    assert transport.disconnected


def test_no_half_close_under_tls(
    tcp_pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    Under TLS (an https:// upstream) a half-close would shut the socket
    below the TLS layer: the connection stays open both ways instead.
    """
    transport, peer, _ = tcp_pair
    protocol = HalfCloseable()
    transport.protocol = protocol
    transport.TLS = True
    flow.close_write(transport)
    assert not at_eof(peer)
    assert protocol.events == []
    assert not transport._writeDisconnecting


def test_half_close_waits_for_queued_bytes(
    tcp_pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    With bytes queued, the half-close is Twisted's: after them, on a later turn.
    """
    transport, peer, _ = tcp_pair
    protocol = HalfCloseable()
    transport.protocol = protocol
    transport.write(b"queued")
    flow.close_write(transport)
    assert not at_eof(peer)
    assert protocol.events == []
    transport.doWrite()
    assert received(peer) == b"queued"
    assert at_eof(peer)
    assert protocol.events == ["write closed"]


class Closing(Protocol):
    def __init__(self) -> None:
        self.lost: list[type] = []

    def connectionLost(self, reason: Failure = main.CONNECTION_DONE) -> None:  # type: ignore[assignment]
        self.lost.append(reason.type)


def test_close_with_nothing_queued_is_done_at_once(
    tcp_pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    close closes before it returns: the peer sees the end, the protocol is
    told the connection is done, and the reactor watches nothing; Twisted's
    loseConnection would watch for writability and close on a later turn.
    """
    transport, peer, reactor = tcp_pair
    protocol = Closing()
    transport.protocol = protocol
    flow.close(transport)
    assert at_eof(peer)
    assert protocol.lost == [error.ConnectionDone]
    assert transport not in reactor.getWriters() and transport not in reactor.getReaders()
    assert transport.disconnected


def test_close_stops_a_streaming_producer(
    tcp_pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    A streaming producer that is not paused does not hold the close (nor
    would it Twisted's); it is told to stop, as Twisted tells it.
    """
    transport, peer, _ = tcp_pair
    protocol = Closing()
    transport.protocol = protocol
    producer = Producer()
    transport.registerProducer(producer, True)
    flow.close(transport)
    assert at_eof(peer)
    assert (protocol.lost, producer.stopped) == ([error.ConnectionDone], True)


@pytest.mark.parametrize("holding", ["queued bytes", "pull producer"])
def test_close_waits_for_what_twisted_waits_for(
    tcp_pair: tuple[tcp.Server, socket.socket, MemoryReactor], holding: str
) -> None:
    """
    Bytes still queued, or a producer Twisted would resume before closing
    (a pull producer, or a paused streaming one), make close Twisted's
    loseConnection: the transport watches for writability, and the end
    comes on a later turn (after the bytes; the producer is resumed first).
    """
    transport, peer, reactor = tcp_pair
    protocol = Closing()
    transport.protocol = protocol
    producer = Producer()
    if holding == "queued bytes":
        transport.write(b"queued")
    else:
        transport.registerProducer(producer, False)  # resumes it once
    flow.close(transport)
    assert protocol.lost == []
    assert transport in reactor.getWriters() and transport.disconnecting
    transport.doWrite()
    if holding == "queued bytes":
        assert received(peer) == b"queued"
        assert protocol.lost == []  # Twisted closes through the reactor after
    else:
        assert producer.resumed == 2 and protocol.lost == []


_LAYOUT_PROBE = """
import socket, sys, tracemalloc
from twisted.internet import tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor
if sys.argv[1] == "taught":
    import proxymap.dataplane.flow
Server = tcp.Server
if sys.argv[2] == "proxymap":  # the accepted connections of proxymap's reactor
    from proxymap.dataplane.reactor import _Server as Server
reactor = MemoryReactor()
pairs = [socket.socketpair() for _ in range(200)]
# As under load: many transports exist before the first registers a producer.
servers = [
    Server(a, Protocol(), ("127.0.0.1", 1), None, i, reactor)
    for i, (a, b) in enumerate(pairs)
]
producers = [Protocol() for _ in servers]
tracemalloc.start()
before = tracemalloc.get_traced_memory()[0]
for t, p in zip(servers, producers):
    t.registerProducer(p, True)
    t.write(b"x")  # queued: dataBuffer and friends come later still
    t.doWrite()
print((tracemalloc.get_traced_memory()[0] - before) / len(servers))
"""


@pytest.mark.skipif(
    sys.implementation.name != "cpython" or sys.version_info < (3, 11),
    reason="the shared attribute layout measured here is CPython's, from 3.11",
)
def test_taught_transports_need_no_dict_of_their_own() -> None:
    """
    Once flow has shown CPython a transport's attributes, a transport that
    registers a producer and writes late in its life allocates next to
    nothing; untaught, each gets a private attribute dict.  A fresh
    interpreter each, because the layout is learnt once per process.  Both
    Twisted's accepted connection and proxymap's own (which on 3.14 starts
    its layout with one name more, see ``flow._teach_layouts``).
    """

    def per_transport(mode: str, kind: str = "twisted") -> float:
        out = subprocess.run(
            [sys.executable, "-c", _LAYOUT_PROBE, mode, kind],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        return float(out)

    assert per_transport("taught") < 100
    assert per_transport("taught", "proxymap") < 100
    assert per_transport("untaught") > 400
