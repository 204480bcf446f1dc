"""
proxymap's reactor: the stock epoll reactor minus the legacy log context
around each event, installed by ``twist proxymap`` unless one was chosen.

The reactor is what is under test, so these tests use real descriptors
(socketpairs, loopback sockets) with a real reactor instance that is never
run: they turn it by hand with ``doPoll``.  No global reactor is touched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from twisted.internet import error, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from proxymap.dataplane import flow
from proxymap.dataplane.reactor import LeanEPollReactor, _NonBlockingSocket, _Port
from tests.conftest import LoggedFailures


class Reader(FileDescriptor):
    """
    A descriptor that records what the reactor asks of it.
    """

    def __init__(self, reactor: LeanEPollReactor, sock: socket.socket, fail_on_lost: bool) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.fail_on_lost = fail_on_lost
        self.reads: list[bytes] = []
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        data = self.sock.recv(100)
        self.reads.append(data)
        if data == b"boom":
            raise RuntimeError("doRead blew up")

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)
        if self.fail_on_lost:
            raise RuntimeError("connectionLost blew up too")


@pytest.fixture
def lean() -> Iterator[LeanEPollReactor]:
    reactor = LeanEPollReactor()
    try:
        yield reactor
    finally:
        # Not removeAll: the sockets may be closed already; the epoll
        # descriptor going away forgets them all.
        reactor._poller.close()
        waker = getattr(reactor, "waker", None)
        if waker is not None:
            waker.connectionLost(None)


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    try:
        yield made
    finally:
        for a, b in made:
            a.close()
            b.close()


def reader(
    lean: LeanEPollReactor, pairs: list[Any], *, fail_on_lost: bool = False
) -> tuple[Reader, socket.socket]:
    mine, theirs = socket.socketpair()
    pairs.append((mine, theirs))
    r = Reader(lean, mine, fail_on_lost)
    lean.addReader(r)
    return r, theirs


def test_ready_descriptors_are_read(lean: LeanEPollReactor, pairs: list[Any]) -> None:
    """
    Every descriptor with bytes waiting gets doRead, and only those.
    """
    first, first_peer = reader(lean, pairs)
    second, _ = reader(lean, pairs)
    third, third_peer = reader(lean, pairs)
    first_peer.send(b"one")
    third_peer.send(b"three")
    lean.doPoll(0)
    assert (first.reads, second.reads, third.reads) == ([b"one"], [], [b"three"])


def test_a_failing_read_disconnects_only_its_descriptor(
    lean: LeanEPollReactor, pairs: list[Any], logged_failures: LoggedFailures
) -> None:
    """
    An exception from doRead is logged and loses that descriptor; the others
    in the same batch are still served.
    """
    bad, bad_peer = reader(lean, pairs)
    good, good_peer = reader(lean, pairs)
    bad_peer.send(b"boom")
    good_peer.send(b"fine")
    lean.doPoll(0)
    assert good.reads == [b"fine"]
    assert [f.check(RuntimeError) for f in bad.lost] == [RuntimeError]
    assert not good.lost
    assert bad not in lean.getReaders()
    logged_failures.expect(RuntimeError)


def test_an_exception_escaping_dispatch_is_logged_and_the_loop_goes_on(
    lean: LeanEPollReactor, pairs: list[Any], logged_failures: LoggedFailures
) -> None:
    """
    The duty kept from Twisted's callWithLogger wrapper: an exception that
    escapes _doReadOrWrite (here connectionLost raising) is logged, and the
    remaining events of the batch are still dispatched.
    """
    bad, bad_peer = reader(lean, pairs, fail_on_lost=True)
    good, good_peer = reader(lean, pairs)
    bad_peer.send(b"boom")
    good_peer.send(b"fine")
    lean.doPoll(0)
    assert good.reads == [b"fine"]
    assert len(bad.lost) == 1
    messages = [str(e["log_failure"].value) for e in logged_failures]
    assert "connectionLost blew up too" in messages
    logged_failures.expect(RuntimeError)


def test_a_descriptor_removed_earlier_in_the_batch_is_skipped(
    lean: LeanEPollReactor, pairs: list[Any]
) -> None:
    """
    When handling one event removes another descriptor that is also ready
    in the same batch, the removed one is not dispatched.
    """
    one, one_peer = reader(lean, pairs)
    other, other_peer = reader(lean, pairs)

    def read_then_drop(me: Reader, peer: Reader) -> None:
        me.reads.append(me.sock.recv(100))
        lean.removeReader(peer)

    one.doRead = lambda: read_then_drop(one, other)  # type: ignore[method-assign]
    other.doRead = lambda: read_then_drop(other, one)  # type: ignore[method-assign]
    one_peer.send(b"a")
    other_peer.send(b"b")
    lean.doPoll(0)
    # Both were ready; whichever ran first removed the other.
    assert sorted([one.reads, other.reads]) == [[], [b"a"]] or sorted([one.reads, other.reads]) == [
        [],
        [b"b"],
    ]


class Recorder(ClientFactory):
    """
    Records the connection or the failure of one connect.
    """

    def __init__(self) -> None:
        self.made: list[Protocol] = []
        self.failed: list[Failure] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        proto = Protocol()
        self.made.append(proto)
        return proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.failed.append(reason)


def turn_until(lean: LeanEPollReactor, done: Callable[[], object], turns: int = 100) -> None:
    """
    Turn the reactor by hand until ``done()`` is true (at most ~5 s).
    """
    for _ in range(turns):
        if done():
            return
        lean.runUntilCurrent()
        lean.doPoll(0.05)
    raise AssertionError("the reactor never got there")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.settimeout(5)
    try:
        yield s
    finally:
        s.close()


def test_connecting_to_an_ip_literal_starts_at_once(
    lean: LeanEPollReactor, listener: socket.socket
) -> None:
    """
    connectTCP to an IPv4 literal sends the SYN before it returns: nothing
    is scheduled for a later turn, and the listener can accept at once.
    Then the connection completes through Twisted as usual, on a transport
    that flow.send writes to directly.
    """
    factory = Recorder()
    lean.connectTCP("127.0.0.1", listener.getsockname()[1], factory, timeout=None)
    assert lean.getDelayedCalls() == []
    accepted, _ = listener.accept()  # the stock reactor would not have connected yet
    try:
        turn_until(lean, lambda: factory.made and factory.made[0].transport)
        transport = factory.made[0].transport
        assert type(transport) in flow._PLAIN_TCP
        flow.send(transport, b"hello")
        assert accepted.recv(5) == b"hello"
    finally:
        accepted.close()


class CountingPoller:
    """
    The reactor's epoll object, counting the changes asked of it.
    """

    def __init__(self, real: Any) -> None:
        self.real = real
        self.changes: list[str] = []
        self.flags: list[int] = []

    def register(self, fd: int, events: int) -> None:
        self.changes.append("add")
        self.flags.append(events)
        self.real.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self.changes.append("mod")
        self.flags.append(events)
        self.real.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self.changes.append("del")
        self.real.unregister(fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@contextmanager
def counting(lean: LeanEPollReactor) -> Iterator[CountingPoller]:
    """
    The reactor's epoll object counting the changes asked of it, for the
    ``with`` block.
    """
    poller = CountingPoller(lean._poller)
    lean._poller = poller
    try:
        yield poller
    finally:
        lean._poller = poller.real


def closes_after_last_bytes(
    lean: LeanEPollReactor, transport: Any, data: bytes, lost: list[Failure]
) -> None:
    """
    Send ``data`` as ``transport``'s last bytes and close it: no
    ``epoll_ctl`` at all, the connection told it is done at once, and the
    reactor no longer knows the socket.
    """
    fd = transport.fileno()
    with counting(lean) as poller:
        flow.send(transport, data, last=True)
        transport.loseConnection()
        assert poller.changes == []
        assert [r.type for r in lost] == [error.ConnectionDone]
        assert fd not in lean._selectables and fd not in lean._reads | lean._writes
        assert poller.real.poll(0) == []  # gone from the epoll set too


def test_a_connect_settles_with_one_change_to_what_is_watched(
    lean: LeanEPollReactor, listener: socket.socket
) -> None:
    """
    Once connected, the socket is watched for reading only, after two
    epoll changes in all (read and write at once, then no more write);
    Twisted's doConnect makes five (and calls connect again).  The socket
    was non-blocking from the start.  The connection then reads as any
    other.
    """
    with counting(lean) as poller:
        factory = Recorder()
        lean.connectTCP("127.0.0.1", listener.getsockname()[1], factory, timeout=None)
        accepted, _ = listener.accept()
        with accepted:
            turn_until(lean, lambda: factory.made and factory.made[0].transport)
            transport: Any = factory.made[0].transport
            assert poller.changes == ["add", "mod"]
            assert poller.flags[0] == select.EPOLLIN | select.EPOLLOUT
            assert transport.socket.gettimeout() == 0.0
            assert not os.get_blocking(transport.socket.fileno())
            assert transport in lean.getReaders() and transport not in lean.getWriters()
            assert transport.doRead.__func__ is tcp.Connection.doRead
            received: list[bytes] = []
            proto: Any = factory.made[0]
            proto.dataReceived = received.append
            accepted.send(b"after connect")
            turn_until(lean, lambda: received)
            assert received == [b"after connect"]


def test_a_refused_connect_is_reported_as_before(lean: LeanEPollReactor) -> None:
    """
    A refusal comes back through Twisted's doConnect: ConnectionRefusedError.
    """
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    factory = Recorder()
    lean.connectTCP("127.0.0.1", port, factory, timeout=None)
    turn_until(lean, lambda: factory.failed)
    assert factory.failed[0].check(error.ConnectionRefusedError)
    assert not factory.made


def test_an_immediate_failure_is_reported_on_the_next_turn(lean: LeanEPollReactor) -> None:
    """
    When connect fails at once (no route to a broadcast address), the
    failure still reaches the factory asynchronously, never inside
    connectTCP.
    """
    factory = Recorder()
    lean.connectTCP("255.255.255.255", 80, factory, timeout=None)
    assert not factory.failed
    turn_until(lean, lambda: factory.failed)
    assert factory.failed[0].check(error.ConnectError)


def test_a_hostname_takes_twisteds_path(lean: LeanEPollReactor, listener: socket.socket) -> None:
    """
    A name still needs resolving: the stock path, on the next turn.
    """
    factory = Recorder()
    connector = lean.connectTCP("localhost", listener.getsockname()[1], factory, timeout=None)
    assert len(lean.getDelayedCalls()) == 1
    connector.stopConnecting()
    assert factory.failed[0].check(error.UserError)


RUNNERS = {
    "twist": "from twisted.application.twist._options import TwistOptions as O",
    "twistd": "from twisted.scripts.twistd import ServerOptions as O",
}


def reactor_under(runner: str, *argv: str) -> str:
    """
    The class of the reactor installed when ``runner`` parses ``argv``, in a
    fresh interpreter (this one already runs a reactor).
    """
    program = (
        RUNNERS[runner] + "\no = O()\no.parseOptions(" + repr(list(argv)) + ")\n"
        "from twisted.internet import reactor\nprint(type(reactor).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.strip()


@pytest.mark.parametrize("runner", ["twist", "twistd"])
def test_proxymap_installs_its_reactor(runner: str) -> None:
    """
    ``twist proxymap`` and ``twistd proxymap`` run on the lean reactor.
    """
    assert reactor_under(runner, "proxymap", "--demo") == "LeanEPollReactor"


@pytest.mark.parametrize("runner", ["twist", "twistd"])
def test_a_chosen_reactor_wins(runner: str) -> None:
    """
    ``--reactor`` before the subcommand still chooses the reactor.
    """
    assert reactor_under(runner, "--reactor=epoll", "proxymap", "--demo") == "EPollReactor"
    assert reactor_under(runner, "--reactor=poll", "proxymap", "--demo") == "PollReactor"


class Accepting(Factory):
    """
    Records what the listening port hands over; ``refuse`` and ``explode``
    name the client ports to turn away (None) or to fail on.
    """

    def __init__(self) -> None:
        self.addresses: list[Any] = []
        self.protocols: list[Protocol] = []
        self.refuse: set[int] = set()
        self.explode: set[int] = set()

    def buildProtocol(self, addr: Any) -> Protocol | None:
        self.addresses.append(addr)
        if addr.port in self.refuse:
            return None
        if addr.port in self.explode:
            raise RuntimeError("buildProtocol blew up")
        proto = Protocol()
        self.protocols.append(proto)
        return proto

    def peers(self) -> list[int]:
        """
        The client ports of the connections handed over, in order.
        """
        return [p.transport.getPeer().port for p in self.protocols]  # type: ignore[union-attr]


@pytest.fixture
def clients() -> Iterator[Callable[[int, int], list[socket.socket]]]:
    made: list[socket.socket] = []

    def connect(port: int, n: int) -> list[socket.socket]:
        batch = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
        made.extend(batch)
        return batch

    try:
        yield connect
    finally:
        for c in made:
            c.close()


@pytest.fixture
def accepting(lean: LeanEPollReactor) -> Iterator[tuple[Accepting, Any]]:
    """
    A factory and the port listening with it on 127.0.0.1.
    """
    factory = Accepting()
    port = lean.listenTCP(0, factory, interface="127.0.0.1")
    assert isinstance(port, _Port)  # what these tests are about
    try:
        yield factory, port
    finally:
        port.stopListening()


def test_a_port_accepts_the_waiting_connections_in_one_call(
    accepting: tuple[Accepting, Any], clients: Callable[[int, int], list[socket.socket]]
) -> None:
    """
    One doRead accepts every waiting client (up to the port's batch size),
    each with its own address, session number and a plain TCP transport
    connected to it; the batch size then follows what came, as Twisted's does.
    """
    factory, port = accepting
    batch = clients(port.getHost().port, 3)
    port.doRead()
    assert [a.port for a in factory.addresses] == [c.getsockname()[1] for c in batch]
    transports = [p.transport for p in factory.protocols]
    assert [t.sessionno for t in transports] == [0, 1, 2]  # type: ignore[union-attr]
    assert all(type(t) in flow._PLAIN_TCP for t in transports)
    for proto, client in zip(factory.protocols, batch, strict=True):
        flow.send(proto.transport, b"hi %d" % client.getsockname()[1])
        assert client.recv(100) == b"hi %d" % client.getsockname()[1]
    assert port.numberAccepts == 3


def test_an_accepted_connection_names_itself_as_twisteds_does(
    accepting: tuple[Accepting, Any], clients: Callable[[int, int], list[socket.socket]]
) -> None:
    """
    The log prefix and the repr, built when asked rather than per
    connection, read as Twisted's tcp.Server writes them; once closed, the
    protocol's part says so.
    """
    factory, port = accepting
    clients(port.getHost().port, 1)
    port.doRead()
    transport: Any = factory.protocols[0].transport
    number = port.getHost().port
    assert transport.logPrefix() == "Protocol,0,127.0.0.1"
    assert repr(transport) == f"<Protocol #0 on {number}>"
    transport.connectionLost(Failure(error.ConnectionDone()))
    assert transport.logPrefix() == "(closed),0,127.0.0.1"
    assert repr(transport) == f"<(closed) #0 on {number}>"


class ShutdownRecorder:
    """
    A socket that records its ``shutdown`` calls and is otherwise the real one.
    """

    def __init__(self, skt: socket.socket) -> None:
        self._skt = skt
        self.shutdowns: list[int] = []

    def shutdown(self, how: int) -> None:
        self.shutdowns.append(how)
        self._skt.shutdown(how)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._skt, name)


@pytest.mark.parametrize(
    ("ending", "shutdowns"),
    [
        # The FIN went with the last bytes: close needs no second shutdown.
        ("send last", [socket.SHUT_WR]),
        # Half-closed first, then closed: the same.
        ("close_write", [socket.SHUT_WR]),
        # A plain close is Twisted's, shutdown included.
        ("close", [socket.SHUT_RDWR]),
    ],
)
def test_an_accepted_connection_shuts_its_socket_down_once(
    accepting: tuple[Accepting, Any],
    clients: Callable[[int, int], list[socket.socket]],
    ending: str,
    shutdowns: list[int],
) -> None:
    """
    Accepted transports close without shutting down a socket whose write
    side is shut already, and the client sees the bytes and an orderly end.
    """
    factory, port = accepting
    (client,) = clients(port.getHost().port, 1)
    port.doRead()
    transport = factory.protocols[0].transport
    recorder = ShutdownRecorder(transport.socket)  # type: ignore[union-attr]
    transport.socket = recorder  # type: ignore[union-attr]
    if ending == "send last":
        flow.send(transport, b"bye", last=True)
    elif ending == "close_write":
        flow.send(transport, b"bye")
        flow.close_write(transport)
    else:
        flow.send(transport, b"bye")
    transport.loseConnection()  # type: ignore[union-attr]
    if ending == "close":
        transport.doWrite()  # type: ignore[union-attr]  # Twisted closes on the next turn
        transport.connectionLost(Failure(error.ConnectionDone()))  # type: ignore[union-attr]
    assert recorder.shutdowns == shutdowns
    assert recorder._skt.fileno() == -1  # closed
    client.settimeout(5)
    assert client.recv(100) == b"bye"
    assert client.recv(100) == b""


def watch_a_socket_numbered(
    lean: LeanEPollReactor, pairs: list[Any], fd: int
) -> tuple[Reader, socket.socket]:
    """
    A new socket given descriptor number ``fd``, watched for reading, and
    its peer.  (The lowest free number goes first; others may be free below.)
    """
    for _ in range(64):
        r, theirs = reader(lean, pairs)
        if r.fileno() == fd:
            return r, theirs
    raise AssertionError(f"descriptor {fd} was not given again")


def test_a_connection_closed_after_its_last_bytes_asks_epoll_nothing(
    lean: LeanEPollReactor,
    accepting: tuple[Accepting, Any],
    clients: Callable[[int, int], list[socket.socket]],
    pairs: list[Any],
) -> None:
    """
    Closing a connection whose last bytes went with its FIN (``flow.send``
    with ``last``, then ``loseConnection``) makes no ``epoll_ctl``: the
    reactor forgets the socket and the close takes it out of the epoll set.
    The protocol hears of it at once, the client gets its bytes and the
    end, and a new socket given the same number is watched as any other.
    """
    factory, port = accepting
    (client,) = clients(port.getHost().port, 1)
    port.doRead()
    proto = factory.protocols[0]
    transport: Any = proto.transport
    lost: list[Failure] = []
    proto.connectionLost = lost.append  # type: ignore[method-assign]
    fd = transport.fileno()
    closes_after_last_bytes(lean, transport, b"bye", lost)
    client.settimeout(5)
    assert (client.recv(100), client.recv(100)) == (b"bye", b"")
    again, peer = watch_a_socket_numbered(lean, pairs, fd)
    peer.send(b"hello again")
    lean.doPoll(0)
    assert again.reads == [b"hello again"]


def test_an_aborted_connection_is_reset(
    lean: LeanEPollReactor,
    accepting: tuple[Accepting, Any],
    clients: Callable[[int, int], list[socket.socket]],
) -> None:
    """
    abortConnection still resets the connection (no orderly close), and
    the protocol hears it was aborted.
    """
    factory, port = accepting
    (client,) = clients(port.getHost().port, 1)
    port.doRead()
    proto = factory.protocols[0]
    lost: list[Failure] = []
    proto.connectionLost = lost.append  # type: ignore[method-assign]
    proto.transport.abortConnection()  # type: ignore[union-attr]
    lean.runUntilCurrent()  # Twisted closes on the next turn
    assert [r.type for r in lost] == [error.ConnectionAborted]
    client.settimeout(5)
    with pytest.raises(ConnectionResetError):
        client.recv(100)


def test_a_client_connection_closes_the_same_way(
    lean: LeanEPollReactor, listener: socket.socket
) -> None:
    """
    An upstream connection closes without ``epoll_ctl`` too, and its
    factory hears that the connection was lost, as from Twisted's close.
    """
    factory = Recorder()
    lost: list[Failure] = []
    factory.clientConnectionLost = lambda connector, reason: lost.append(reason)  # type: ignore[method-assign]
    lean.connectTCP("127.0.0.1", listener.getsockname()[1], factory, timeout=None)
    accepted, _ = listener.accept()
    with accepted:
        turn_until(lean, lambda: factory.made and factory.made[0].transport)
        transport: Any = factory.made[0].transport
        closes_after_last_bytes(lean, transport, b"last words", lost)
        accepted.settimeout(5)
        assert (accepted.recv(100), accepted.recv(100)) == (b"last words", b"")


@implementer(IHalfCloseableProtocol)
class HalfOpen(Protocol):
    """
    Stays open for writing when its peer ends (or closes with ``flow.close``
    when ``close`` is set), and records what it hears.
    """

    def __init__(self, close: bool) -> None:
        self.close = close
        self.events: list[object] = []

    def readConnectionLost(self) -> None:
        self.events.append("read closed")
        if self.close:
            flow.close(self.transport)

    def writeConnectionLost(self) -> None:
        self.events.append("write closed")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.events.append(reason.type)


@pytest.mark.parametrize(
    "kind, changes, events",
    [
        ("closes", [], ["read closed", error.ConnectionDone]),
        ("not half-closeable", [], []),  # Twisted closes it
        ("stays half-open", ["del"], ["read closed"]),
    ],
)
def test_the_end_of_input_is_told_before_the_socket_is_unwatched(
    lean: LeanEPollReactor,
    accepting: tuple[Accepting, Any],
    clients: Callable[[int, int], list[socket.socket]],
    kind: str,
    changes: list[str],
    events: list[object],
) -> None:
    """
    When a client ends its side, the protocol hears it first; a connection
    closed meanwhile leaves epoll to the close (no ``epoll_ctl``), and one
    left half-open stops being watched for reading (one), so its end is
    not reported again.  Either way its client gets what it writes after.
    """
    factory, port = accepting
    (client,) = clients(port.getHost().port, 1)
    port.doRead()
    transport: Any = factory.protocols[0].transport
    protocol = Protocol() if kind == "not half-closeable" else HalfOpen(close=kind == "closes")
    transport.protocol = protocol
    protocol.transport = transport
    fd = transport.fileno()
    with counting(lean) as poller:
        client.shutdown(socket.SHUT_WR)
        lean.doPoll(1)
        assert poller.changes == changes
        assert getattr(protocol, "events", []) == events
        assert fd not in lean._reads
        assert [fd_ for fd_, _ in poller.real.poll(0) if fd_ == fd] == []
    client.settimeout(5)
    if changes:  # still open: it can answer, then close
        flow.send(transport, b"after your end", last=True)
        transport.loseConnection()
        assert client.recv(100) == b"after your end"
    assert client.recv(100) == b""


def test_an_ipv6_client_gets_an_ipv6_address(lean: LeanEPollReactor) -> None:
    """
    accept gives IPv6 peers as 4-tuples; the factory and the transport get
    Twisted's IPv6Address as from the stock port.  (The host's ``%scope``
    suffix, which the port renders as Twisted's does, appears only for
    link-local peers, which loopback cannot make.)
    """
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    factory = Accepting()
    try:
        port = lean.listenTCP(0, factory, interface="::1")
    except error.CannotListenError:
        pytest.skip("no IPv6 loopback")
    client = socket.create_connection(("::1", port.getHost().port), timeout=5)
    try:
        port.doRead()
        (addr,) = factory.addresses
        assert (type(addr), addr.host, addr.port) == (IPv6Address, "::1", client.getsockname()[1])
        assert factory.protocols[0].transport.getPeer() == addr  # type: ignore[union-attr]
    finally:
        client.close()
        port.stopListening()


def test_a_port_logs_no_line_of_its_own(lean: LeanEPollReactor) -> None:
    """
    Listening and closing log nothing per port (proxymap logs a line per
    mapping), where the stock port logs a line each time: the control,
    which shows the capture sees the legacy log.  The port still listens,
    and closes.
    """
    factory = Accepting()
    factory.noisy = False  # its "Starting factory" is not the port's line
    with capturedLogs() as ours:
        port = lean.listenTCP(0, factory, interface="127.0.0.1")
        number = port.getHost().port
        with socket.create_connection(("127.0.0.1", number), timeout=5):
            pass
        port.stopListening()
        lean.runUntilCurrent()  # the close is a call for the next turn
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", number), timeout=5)
    with capturedLogs() as stock:
        control = tcp.Port(0, factory, interface="127.0.0.1", reactor=lean)
        control.startListening()
        control.stopListening()
        lean.runUntilCurrent()
    assert [formatEvent(e) for e in ours] == []
    lines = [formatEvent(e) for e in stock]
    assert any("starting on" in line for line in lines), lines
    assert any("Closed" in line for line in lines), lines


def test_a_taken_port_cannot_be_listened_on(
    lean: LeanEPollReactor, listener: socket.socket
) -> None:
    """
    Binding a port in use raises Twisted's CannotListenError, which
    proxymap turns into its one-line start-up error; nothing is left open.
    """
    taken = listener.getsockname()[1]

    def sockets() -> set[str]:
        found = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor
                if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                    found.add(fd)
        return found

    before = sockets()
    with pytest.raises(error.CannotListenError) as raised:
        lean.listenTCP(taken, Accepting(), interface="127.0.0.1")
    assert raised.value.socketError.errno == errno.EADDRINUSE
    assert (raised.value.interface, raised.value.port) == ("127.0.0.1", taken)
    assert sockets() == before


def test_a_full_batch_leaves_the_rest_for_the_next_call(
    accepting: tuple[Accepting, Any], clients: Callable[[int, int], list[socket.socket]]
) -> None:
    """
    The loop is bounded by the batch size; a full batch raises it by 20,
    and the next call takes what was left.
    """
    factory, port = accepting
    port.numberAccepts = 2
    clients(port.getHost().port, 5)
    port.doRead()
    assert (len(factory.protocols), port.numberAccepts) == (2, 22)
    port.doRead()
    assert (len(factory.protocols), port.numberAccepts) == (5, 3)
    port.doRead()  # nothing waits: EAGAIN at once, still at least one next time
    assert (len(factory.protocols), port.numberAccepts) == (5, 1)


class AcceptCounter:
    """
    A listening socket that counts its ``accept`` calls and is otherwise the
    real one.
    """

    def __init__(self, skt: socket.socket) -> None:
        self._skt = skt
        self.accepts = 0

    def accept(self) -> tuple[socket.socket, Any]:
        self.accepts += 1
        return self._skt.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._skt, name)


@pytest.fixture
def counted(accepting: tuple[Accepting, Any]) -> Iterator[tuple[Accepting, Any, AcceptCounter]]:
    """
    The accepting port, its socket counting ``accept`` calls, and its batch
    at one (where a port taking one connection per wake settles).
    """
    factory, port = accepting
    real = port.socket
    port.socket = counter = AcceptCounter(real)
    port.numberAccepts = 1
    try:
        yield factory, port, counter
    finally:
        port.socket = real


def test_one_connection_per_poll_takes_one_accept_each(
    lean: LeanEPollReactor,
    counted: tuple[Accepting, Any, AcceptCounter],
    clients: Callable[[int, int], list[socket.socket]],
) -> None:
    """
    A port woken for one connection at a time (a port of a range, under
    load spread over the range) accepts it and stops: no further ``accept``
    that can only end in ``EAGAIN``, and its batch stays at one.
    """
    factory, port, counter = counted
    for served in (1, 2, 3):
        clients(port.getHost().port, 1)
        lean.doPoll(0)
        assert (len(factory.protocols), counter.accepts, port.numberAccepts) == (served,) * 2 + (1,)
        lean.doPoll(0)  # another poll, with nothing waiting on the port
        assert counter.accepts == served


def test_a_queue_on_consecutive_polls_grows_a_batch_of_one(
    lean: LeanEPollReactor,
    counted: tuple[Accepting, Any, AcceptCounter],
    clients: Callable[[int, int], list[socket.socket]],
) -> None:
    """
    When connections queue up, the port is full on consecutive polls: the
    second one raises the batch by 20, as Twisted does, and the next poll
    takes the rest of the queue at once.
    """
    factory, port, counter = counted
    clients(port.getHost().port, 4)
    lean.doPoll(0)
    assert (len(factory.protocols), port.numberAccepts) == (1, 1)
    lean.doPoll(0)
    assert (len(factory.protocols), port.numberAccepts) == (2, 21)
    lean.doPoll(0)
    assert (len(factory.protocols), port.numberAccepts, counter.accepts) == (4, 2, 5)


def test_a_refused_connection_is_closed_and_the_next_one_served(
    accepting: tuple[Accepting, Any], clients: Callable[[int, int], list[socket.socket]]
) -> None:
    factory, port = accepting
    turned_away, served = clients(port.getHost().port, 2)
    factory.refuse.add(turned_away.getsockname()[1])
    port.doRead()
    assert turned_away.recv(10) == b""  # closed by the port
    assert factory.peers() == [served.getsockname()[1]]


def test_an_exception_from_the_factory_is_logged_and_the_port_keeps_listening(
    lean: LeanEPollReactor,
    accepting: tuple[Accepting, Any],
    clients: Callable[[int, int], list[socket.socket]],
    logged_failures: LoggedFailures,
) -> None:
    factory, port = accepting
    (bad,) = clients(port.getHost().port, 1)
    factory.explode.add(bad.getsockname()[1])
    lean.doPoll(0.5)
    assert len(logged_failures.expect(RuntimeError)) == 1
    assert port.connected and port in lean.getReaders()
    (good,) = clients(port.getHost().port, 1)
    lean.doPoll(0.5)
    assert factory.peers() == [good.getsockname()[1]]


class FlakyListener:
    """
    A listening socket whose first ``failures`` accepts fail with ``errno``.
    """

    def __init__(self, real: socket.socket, errno_: int, failures: int) -> None:
        self.real = real
        self.errno = errno_
        self.failures = failures

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(self.errno, os.strerror(self.errno))
        return self.real.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.mark.parametrize(
    ("errno_", "outcome"),
    [
        # A firewall's veto: Twisted skips it and accepts who waits.
        (errno.EPERM, "served"),
        # Logged, the call ends; the next call serves who waits.
        (errno.ECONNABORTED, "waiting"),
        # Out of descriptors: Twisted frees its reserved one and closes
        # whoever waits, so they do not queue while nothing can be served.
        (errno.EMFILE, "closed"),
    ],
)
def test_other_accept_errors_take_twisteds_path(
    accepting: tuple[Accepting, Any],
    clients: Callable[[int, int], list[socket.socket]],
    errno_: int,
    outcome: str,
) -> None:
    """
    Only EAGAIN is handled by the lean loop; any other accept error is
    Twisted's to handle (here it meets the error once more on its own
    accept), and the port goes on listening.
    """
    factory, port = accepting
    real = port.socket
    (first,) = clients(port.getHost().port, 1)
    port.socket = FlakyListener(real, errno_, failures=2)
    try:
        port.doRead()
    finally:
        port.socket = real
    if outcome == "served":
        assert factory.peers() == [first.getsockname()[1]]
    elif outcome == "waiting":
        assert factory.peers() == []
        port.doRead()
        assert factory.peers() == [first.getsockname()[1]]
    else:
        assert factory.peers() == []
        assert first.recv(10) == b""
    (second,) = clients(port.getHost().port, 1)
    port.doRead()
    assert factory.peers()[-1] == second.getsockname()[1]


def test_a_socket_made_non_blocking_still_changes_when_asked() -> None:
    """
    Asking a socket created non-blocking to be non-blocking is skipped; any
    real change still reaches the socket, and back.
    """
    with _NonBlockingSocket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as s:
        assert s.gettimeout() == 0.0 and not os.get_blocking(s.fileno())
        s.setblocking(False)
        assert not os.get_blocking(s.fileno())
        s.setblocking(True)
        assert s.gettimeout() is None and os.get_blocking(s.fileno())
        s.setblocking(False)
        assert s.gettimeout() == 0.0 and not os.get_blocking(s.fileno())


class Watched(FileDescriptor):
    def __init__(self, sock: socket.socket, reactor: LeanEPollReactor) -> None:
        super().__init__(reactor)
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()


def test_watch_new_adds_reading_and_writing_in_one_change(lean: LeanEPollReactor) -> None:
    """
    A new descriptor is registered for both in one change; one watched
    already (for reading, say) is changed as addReader and addWriter would.
    """
    a, b = socket.socketpair()
    try:
        with counting(lean) as poller:
            new, known = Watched(a, lean), Watched(b, lean)
            lean.watch_new(new)
            known.startReading()
            lean.watch_new(known)
            assert poller.changes == ["add", "add", "mod"]
            both = select.EPOLLIN | select.EPOLLOUT
            assert poller.flags == [both, select.EPOLLIN, both]
            for watched in (new, known):
                assert watched in lean.getReaders() and watched in lean.getWriters()
            lean.removeAll()
    finally:
        a.close()
        b.close()
