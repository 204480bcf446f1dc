"""
proxymap's reactor: the stock epoll reactor minus the legacy log context
around each event, installed by ``twist proxymap`` unless one was chosen.

The reactor is what is under test, so these tests use real descriptors
(socketpairs, loopback sockets) with a real reactor instance that is never
run: they turn it by hand with ``doPoll``.  No global reactor is touched.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure

from proxymap.dataplane import flow
from proxymap.dataplane.reactor import LeanEPollReactor
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
