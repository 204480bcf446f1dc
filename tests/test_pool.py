"""
Idle upstream connections kept across client connections (dataplane/pool.py),
in memory: client and upstream legs on StringTransports, a MemoryReactorClock.
"""

from __future__ import annotations

import gc
import platform
import socket
import weakref
from collections.abc import Iterator

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from proxymap.config import Limits
from proxymap.dataplane.pool import UpstreamPool
from proxymap.dataplane.server import ProxyServer
from proxymap.dataplane.upstream import UpstreamProtocol
from proxymap.sessions import EndReason

from .helpers import PORT, Harness, creds, delays_acks, head_of, header

GET = b"GET http://example.com/page HTTP/1.1\r\nHost: example.com\r\n\r\n"
ONE_SHOT = b"GET http://example.com/page HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
POST = (
    b"POST http://example.com/form HTTP/1.1\r\nHost: example.com\r\n"
    b"Content-Length: 3\r\nConnection: close\r\n\r\nabc"
)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
DONE = Failure(ConnectionDone())


def pool_of(h: Harness) -> UpstreamPool:
    assert h.tally.pool is not None
    return h.tally.pool


def one_shot(
    h: Harness, answer: bool = True
) -> tuple[ProxyServer, StringTransport, UpstreamProtocol, StringTransport]:
    """
    A client connection's single request, answered over a new upstream
    connection, and the client gone.
    """
    proto, client = h.client()
    proto.dataReceived(ONE_SHOT)
    up, upstream = h.upstream()
    up.dataReceived(OK)
    assert client.disconnecting
    proto.connectionLost(DONE)
    return proto, client, up, upstream


def one_shots_at_once(h: Harness, n: int) -> list[tuple[UpstreamProtocol, StringTransport]]:
    """
    ``n`` client connections at once, each with one request answered over
    its own upstream connection (which each leaves as it closes).
    """
    clients = [h.client() for _ in range(n)]
    for proto, _ in clients:
        proto.dataReceived(ONE_SHOT)
    legs = [h.upstream(i) for i in range(n)]
    for up, _ in legs:
        up.dataReceived(OK)
    for proto, _ in clients:
        proto.connectionLost(DONE)
    return legs


def sent_over_kept(h: Harness) -> tuple[StringTransport, UpstreamProtocol]:
    """
    A one-shot client left its upstream connection kept; the next client's
    request has just gone over it.  Returns that client's transport and
    the kept connection.
    """
    _, _, up, _ = one_shot(h)
    proto, client = h.client()
    proto.dataReceived(ONE_SHOT)
    return client, up


def test_one_shot_clients_share_one_upstream_connection() -> None:
    """
    The next client connection of the session takes the connection the last
    one left, with the session's credentials, and gets its own answer.
    """
    h = Harness(pool=True)
    _, first, up, upstream = one_shot(h)
    assert not upstream.disconnecting
    assert len(pool_of(h)) == 1

    proto, client = h.client()
    proto.dataReceived(ONE_SHOT)
    assert len(h.reactor.tcpClients) == 1
    assert len(pool_of(h)) == 0
    assert up.server is proto
    second = upstream.value().split(b"\r\n\r\n")[1]
    assert second.startswith(b"GET http://example.com/page HTTP/1.1")
    assert header(head_of(second + b"\r\n\r\n")[1], b"proxy-authorization") == [creds("sess0001")]
    up.dataReceived(OK)
    assert head_of(client.value())[2] == b"hello"
    assert first.value().count(b"hello") == 1
    assert pool_of(h).reused == 1
    # The first client's leg no longer hears from this connection, which
    # is parked again for the next one.
    assert len(pool_of(h)) == 1


def test_a_parked_connection_lets_go_of_the_client_leg_it_served() -> None:
    """
    The finished client leg is freed when its connection is parked, not
    kept until the next client of the session takes the connection; that
    client then gets the connection as usual.
    """
    h = Harness(pool=True)
    gc.disable()  # on CPython, freed by reference counting alone
    try:
        first, first_client, up, upstream = one_shot(h)
        assert len(pool_of(h)) == 1 and not upstream.disconnecting
        left = weakref.ref(first)
        del first, first_client
        if platform.python_implementation() != "CPython":
            gc.collect()  # PyPy frees only by collection: unreachable is what counts
        assert left() is None
    finally:
        gc.enable()
    proto, client = h.client()
    proto.dataReceived(ONE_SHOT)
    assert up.server is proto
    up.dataReceived(OK)
    assert head_of(client.value())[2] == b"hello"
    assert len(h.reactor.tcpClients) == 1


def test_keep_alive_client_leaving_idle_parks_its_connection() -> None:
    h = Harness(pool=True)
    proto, client = h.client()
    proto.dataReceived(GET)
    up, upstream = h.upstream()
    up.dataReceived(OK)
    assert not client.disconnecting
    proto.connectionLost(DONE)
    assert not upstream.disconnecting
    assert len(pool_of(h)) == 1


@pytest.mark.parametrize("pool", [True, False])
def test_a_connect_after_a_request_gets_its_own_upstream_connection(pool: bool) -> None:
    """
    A client connection that sent a request, then a CONNECT (a browser's
    keep-alive connection does), tunnels over a connection of its own: the
    one that carried the request could not become a tunnel at the vendor.
    That one is parked for the session (or closed, with no pool).
    """
    h = Harness(pool=pool)
    proto, client = h.client()
    proto.dataReceived(GET)
    up, upstream = h.upstream()
    up.dataReceived(OK)
    proto.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert len(h.reactor.tcpClients) == 2
    assert upstream.disconnecting is not pool
    assert len(h.tally.pool or ()) == (1 if pool else 0)
    tunnel_up, tunnel = h.upstream()
    assert tunnel.value().startswith(b"CONNECT example.com:443 HTTP/1.1\r\n")
    client.clear()
    tunnel_up.dataReceived(b"HTTP/1.1 200 Connection established\r\n\r\n")
    proto.dataReceived(b"tls bytes")
    assert client.value() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert tunnel.value().endswith(b"\r\n\r\ntls bytes")
    assert b"tls bytes" not in upstream.value()


def test_without_a_pool_the_connection_closes() -> None:
    h = Harness()
    _, _, _, upstream = one_shot(h)
    assert upstream.disconnecting


def test_none_kept_when_max_idle_is_zero() -> None:
    h = Harness(Limits(max_idle_upstreams=0), pool=True)
    _, _, _, upstream = one_shot(h)
    assert upstream.disconnecting
    assert len(pool_of(h)) == 0


def test_a_request_with_a_body_gets_a_fresh_connection() -> None:
    """
    A parked connection may have been closed by the vendor unseen; only a
    request that may be sent twice takes one.
    """
    h = Harness(pool=True)
    one_shot(h)
    proto, _client = h.client()
    proto.dataReceived(POST)
    assert len(h.reactor.tcpClients) == 2
    assert len(pool_of(h)) == 1
    _up, upstream = h.upstream()
    assert upstream.value().startswith(b"POST http://example.com/form")


def test_stale_parked_connection_is_retried_on_a_new_one() -> None:
    """
    The vendor closed the kept connection as the request went: the request
    goes again, once, on a new connection, and the client never knows.
    """
    h = Harness(pool=True)
    client, up = sent_over_kept(h)
    up.connectionLost(DONE)
    assert len(h.reactor.tcpClients) == 2
    fresh, fresh_transport = h.upstream()
    first, lines, _ = head_of(fresh_transport.value())
    assert first == b"GET http://example.com/page HTTP/1.1"
    assert header(lines, b"proxy-authorization") == [creds("sess0001")]
    fresh.dataReceived(OK)
    assert head_of(client.value())[0] == b"HTTP/1.1 200 OK"
    assert pool_of(h).retried == 1


def test_a_retry_is_not_retried() -> None:
    h = Harness(pool=True)
    client, up = sent_over_kept(h)
    up.connectionLost(Failure(ConnectionLost()))
    fresh, _ = h.upstream()
    fresh.connectionLost(DONE)
    assert len(h.reactor.tcpClients) == 2
    assert head_of(client.value())[0] == b"HTTP/1.1 502 Bad Gateway"


@pytest.mark.parametrize(
    ("answer", "starts", "ends"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart",
            b"HTTP/1.1 200 OK",
            b"part",
            id="the answer began",
        ),
        pytest.param(b"HTTP/1.1 2", b"HTTP/1.1 502 Bad Gateway", b"\n", id="part of a head"),
        # The client saw a 103 of this exchange; it gets a 502 after it.
        pytest.param(
            b"HTTP/1.1 103 Early Hints\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 502 Bad Gateway",
            b"\n",
            id="an interim answer",
        ),
    ],
)
def test_no_retry_once_the_vendor_said_anything(answer: bytes, starts: bytes, ends: bytes) -> None:
    """
    A kept connection that closes after any byte of an answer: the request
    is not sent again on another connection.
    """
    h = Harness(pool=True)
    client, up = sent_over_kept(h)
    up.dataReceived(answer)
    up.connectionLost(DONE)
    assert len(h.reactor.tcpClients) == 1
    assert client.value().startswith(starts)
    assert client.value().endswith(ends)
    assert client.disconnecting


def test_keep_alive_reuse_is_retried_too() -> None:
    """
    Within one client connection as well: the second request over a
    connection that served the first is sent again if it closes unanswered.
    """
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, _ = h.upstream()
    up.dataReceived(OK)
    proto.dataReceived(GET)
    up.connectionLost(DONE)
    assert len(h.reactor.tcpClients) == 2
    fresh, _ = h.upstream()
    fresh.dataReceived(OK)
    assert client.value().count(b"hello") == 2
    assert b"502" not in client.value()


def test_a_request_that_is_not_idempotent_is_never_sent_twice() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    up, _upstream = h.upstream()
    up.dataReceived(OK)
    proto.dataReceived(b"DELETE http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n")
    proto.dataReceived(b"POST http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n")
    up.dataReceived(OK)  # DELETE answered
    up.connectionLost(DONE)  # POST not
    assert len(h.reactor.tcpClients) == 1
    assert client.value().count(b"hello") == 2
    assert client.value().endswith(b"the upstream closed the connection\n")


def test_the_first_request_of_a_connection_is_not_retried() -> None:
    h = Harness(pool=True)
    proto, client = h.client()
    proto.dataReceived(ONE_SHOT)
    up, _ = h.upstream()
    up.connectionLost(DONE)
    assert len(h.reactor.tcpClients) == 1
    assert head_of(client.value())[0] == b"HTTP/1.1 502 Bad Gateway"


def test_rotation_closes_parked_connections() -> None:
    h = Harness(pool=True, lifetime="90s")
    _, _, _, upstream = one_shot(h)
    h.reactor.advance(90)
    assert upstream.disconnecting
    assert len(pool_of(h)) == 0
    proto, _ = h.client()
    proto.dataReceived(ONE_SHOT)
    assert len(h.reactor.tcpClients) == 2
    _, fresh = h.upstream()
    assert header(head_of(fresh.value())[1], b"proxy-authorization") == [creds("sess0002")]


def test_a_closed_session_takes_its_parked_connections() -> None:
    h = Harness(pool=True)
    _, _, _, upstream = one_shot(h)
    h.registry.close(h.registry.current(PORT).id)
    assert upstream.disconnecting
    assert len(pool_of(h)) == 0


def test_a_connection_of_an_ended_session_is_not_parked() -> None:
    """
    A keep-alive client still holds a connection of a session that ended
    (rotation without closing clients): when it leaves, so does that connection.
    """
    h = Harness(pool=True)
    proto, _ = h.client()
    proto.dataReceived(GET)
    up, upstream = h.upstream()
    up.dataReceived(OK)
    h.registry.end(h.registry.current(PORT).id, EndReason.RENEWED)
    proto.connectionLost(DONE)
    assert upstream.disconnecting
    assert len(pool_of(h)) == 0


def test_other_sessions_parked_connections_stay() -> None:
    h = Harness(pool=True)
    _, _, _, mine = one_shot(h)
    proto, _ = h.client(10202)
    proto.dataReceived(ONE_SHOT)
    up, theirs = h.upstream()
    up.dataReceived(OK)
    h.registry.reset(PORT)
    assert mine.disconnecting
    assert not theirs.disconnecting
    assert len(pool_of(h)) == 1


def test_over_a_socks5_upstream_kept_connections_go_by_target() -> None:
    """
    A SOCKS5 upstream connection leads to one target: it is kept under
    the session and that target, taken again only for it, and goes with
    the session like any other.
    """
    from .test_socks import OK_REPLY, socks_upstream_handshake

    h = Harness(pool=True, upstream="socks5://gw.example.com:1080")
    legs = {}
    for host in (b"a.example", b"b.example"):
        proto, _ = h.client()
        proto.dataReceived(b"GET http://" + host + b"/ HTTP/1.1\r\nConnection: close\r\n\r\n")
        up, upstream, _, _ = socks_upstream_handshake(h)
        up.dataReceived(OK_REPLY)
        up.dataReceived(OK)
        proto.connectionLost(DONE)
        legs[host] = (up, upstream)
    assert len(pool_of(h)) == 2
    proto, client = h.client()
    proto.dataReceived(b"GET http://a.example/again HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert len(h.reactor.tcpClients) == 2  # no new connection
    up_a, upstream_a = legs[b"a.example"]
    assert head_of(upstream_a.value().split(b"\r\n\r\n", 1)[1])[0] == b"GET /again HTTP/1.1"
    assert legs[b"b.example"][1].value().count(b"GET ") == 1
    up_a.dataReceived(OK)
    assert client.value().endswith(b"\r\n\r\nhello")
    proto.connectionLost(DONE)
    assert len(pool_of(h)) == 2
    h.registry.reset(PORT)
    assert all(upstream.disconnecting for _, upstream in legs.values())
    assert len(pool_of(h)) == 0


def test_a_session_ending_closes_its_own_among_many() -> None:
    """
    One session's end closes its kept connections and no other's, however
    many other sessions keep theirs.
    """
    h = Harness(pool=True, ports=f"{PORT}-{PORT + 49}")
    legs = {}
    for port in range(PORT, PORT + 50):
        proto, _ = h.client(port)
        proto.dataReceived(ONE_SHOT)
        up, upstream = h.upstream()
        up.dataReceived(OK)
        proto.connectionLost(DONE)
        legs[port] = upstream
    assert len(pool_of(h)) == 50
    for port in range(PORT, PORT + 50, 2):
        h.registry.reset(port)
    assert [p for p, upstream in legs.items() if upstream.disconnecting] == list(
        range(PORT, PORT + 50, 2)
    )
    assert len(pool_of(h)) == 25


class Parked:
    """
    A stand-in for an idle upstream connection, counting how often the
    pool reads which session it belongs to.
    """

    reads = 0
    idle = True
    parked_at = 0.0

    def __init__(self, session: object) -> None:
        self._target = Target(session)
        self.key = session
        self.closed = False

    @property
    def target(self) -> Target:
        Parked.reads += 1
        return self._target

    def park(self, pool: UpstreamPool) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Target:
    def __init__(self, session: object) -> None:
        self.session = session


class Ended:
    ended = None


def test_a_session_end_reads_only_its_own_kept_connections() -> None:
    """
    Ending every session of a large range (a release of all, a stop)
    must not read every kept connection for each: 10,000 of each took
    the reactor most of a second.
    """
    pool = UpstreamPool(Clock(), Limits(max_idle_upstreams=1000))
    sessions = [Ended() for _ in range(1000)]
    parked = [Parked(session) for session in sessions]
    for up in parked:
        assert pool.park(up)  # type: ignore[arg-type]
    Parked.reads = 0
    for session in sessions[:10]:
        pool.session_ended(session, EndReason.RELEASED)  # type: ignore[arg-type]
    assert Parked.reads <= 10
    assert [up.closed for up in parked[:11]] == [True] * 10 + [False]
    assert len(pool) == 990
    assert pool.take(sessions[10]) is parked[10]
    assert pool.take(sessions[0]) is None


def test_ports_do_not_share_connections() -> None:
    h = Harness(pool=True)
    one_shot(h)
    proto, _ = h.client(10202)
    proto.dataReceived(ONE_SHOT)
    assert len(h.reactor.tcpClients) == 2


def test_a_parked_connection_closed_by_the_vendor_leaves_the_pool() -> None:
    h = Harness(pool=True)
    _old, old_client, up, _ = one_shot(h)
    written = old_client.value()
    up.connectionLost(DONE)
    assert len(pool_of(h)) == 0
    assert old_client.value() == written
    proto, _ = h.client()
    proto.dataReceived(ONE_SHOT)
    assert len(h.reactor.tcpClients) == 2


def test_bytes_nobody_asked_for_close_a_parked_connection() -> None:
    h = Harness(pool=True)
    _, _, up, upstream = one_shot(h)
    up.dataReceived(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
    assert upstream.disconnecting
    # Not yet lost: taking it skips it.
    proto, _ = h.client()
    proto.dataReceived(ONE_SHOT)
    assert len(h.reactor.tcpClients) == 2
    up.connectionLost(DONE)
    assert len(pool_of(h)) == 0


@pytest.fixture
def fresh_socket() -> Iterator[socket.socket]:
    """
    A connected TCP socket on 127.0.0.1 (its peer held open), fresh: the
    kernel does not yet count it as interactive.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    with near, far:
        assert not delays_acks(near)
        yield near


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="Linux only")
@pytest.mark.parametrize(("parked_for", "asked"), [(0.029, False), (0.03, True), (5.0, True)])
def test_a_connection_kept_a_while_asks_for_delayed_acks(
    fresh_socket: socket.socket, parked_for: float, asked: bool
) -> None:
    """
    A kept connection taken again after 30 ms or more asks the kernel to
    treat the coming exchange as interactive, so that the response's ACK
    waits instead of going out as proxymap reads it (flow.interactive);
    one taken sooner is left to the kernel, which still counts it so.
    """
    h = Harness(pool=True)
    _, _, up, upstream = one_shot(h)
    upstream.getHandle = lambda: fresh_socket  # type: ignore[attr-defined]
    h.reactor.advance(parked_for)
    proto, _client = h.client()
    proto.dataReceived(ONE_SHOT)
    assert proto._upstream is up
    assert delays_acks(fresh_socket) is asked


def test_parked_connections_expire() -> None:
    h = Harness(Limits(idle_upstream_timeout=30.0), pool=True)
    _, _, up, upstream = one_shot(h)
    h.reactor.advance(20)
    proto, _ = h.client()
    proto.dataReceived(GET)
    assert len(h.reactor.tcpClients) == 1  # taken back at t=20
    up.dataReceived(OK)
    h.reactor.advance(1)
    proto.connectionLost(DONE)  # parked again at t=21
    h.reactor.advance(29.5)
    assert not upstream.disconnecting
    h.reactor.advance(0.5)
    assert upstream.disconnecting
    assert len(pool_of(h)) == 0


@pytest.mark.parametrize(("before", "after"), [(3600.0, 30.0), (30.0, 300.0)])
def test_a_reload_times_parked_connections_by_the_new_timeout(before: float, after: float) -> None:
    """
    A reload's ``idle_upstream_timeout`` applies to the connections parked
    already, counted from when each was parked: lowered, they go sooner
    (and no longer hold back the sweep of those parked after them).  (The
    session's lifetime, 600 s, would end the connection at any rate.)
    """
    h = Harness(Limits(idle_upstream_timeout=before), pool=True)
    _, _, _, upstream = one_shot(h)  # parked at t=0
    h.reactor.advance(10)
    pool_of(h).configure(Limits(idle_upstream_timeout=after))
    h.reactor.advance(after - 10 - 0.5)
    assert not upstream.disconnecting
    h.reactor.advance(0.5)
    assert upstream.disconnecting
    assert len(pool_of(h)) == 0
    assert all(c.func != pool_of(h)._expire for c in h.reactor.getDelayedCalls())


def test_a_timeout_lowered_below_what_is_parked_closes_it_at_once() -> None:
    h = Harness(Limits(idle_upstream_timeout=3600.0), pool=True)
    _, _, _, upstream = one_shot(h)
    h.reactor.advance(60)
    pool_of(h).configure(Limits(idle_upstream_timeout=30.0))
    assert upstream.disconnecting


def test_at_most_max_idle_the_oldest_goes() -> None:
    h = Harness(Limits(max_idle_upstreams=2), pool=True)
    legs = one_shots_at_once(h, 3)
    assert [t.disconnecting for _, t in legs] == [True, False, False]
    assert len(pool_of(h)) == 2
    # The most recent is reused first.
    proto, _ = h.client()
    proto.dataReceived(ONE_SHOT)
    assert legs[2][1].value().count(b"GET ") == 2
    assert legs[1][1].value().count(b"GET ") == 1


def test_fewer_allowed_after_a_reload() -> None:
    h = Harness(pool=True)
    legs = one_shots_at_once(h, 3)
    pool_of(h).configure(Limits(max_idle_upstreams=1))
    assert [t.disconnecting for _, t in legs] == [True, True, False]


def test_a_draining_port_parks_nothing() -> None:
    h = Harness(pool=True)
    h.factory.draining = True
    _, _, _, upstream = one_shot(h)
    assert upstream.disconnecting


def test_close_all() -> None:
    h = Harness(pool=True)
    _, _, _, upstream = one_shot(h)
    pool_of(h).close_all()
    assert upstream.disconnecting
    # A client leg that ends after the stop began parks nothing.
    proto, _ = h.client()
    proto.dataReceived(GET)
    up, later = h.upstream()
    up.dataReceived(OK)
    proto.connectionLost(DONE)
    assert later.disconnecting
    assert len(pool_of(h)) == 0
    sweeps = [c for c in h.reactor.getDelayedCalls() if c.func == pool_of(h)._expire]
    assert sweeps == []


@pytest.mark.parametrize(
    ("request_head", "answer", "client_lost"),
    [
        pytest.param(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            b"HTTP/1.1 200 Connection established\r\n\r\n",
            DONE,
            id="a tunnel",
        ),
        pytest.param(
            GET,
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart",
            Failure(ConnectionLost()),
            id="mid-response",
        ),
        pytest.param(
            ONE_SHOT,
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            None,
            id="the vendor will close it",
        ),
        pytest.param(
            ONE_SHOT,
            OK + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON",
            DONE,
            id="bytes after the answer",
        ),
    ],
)
def test_never_parked(request_head: bytes, answer: bytes, client_lost: Failure | None) -> None:
    h = Harness(pool=True)
    proto, _ = h.client()
    proto.dataReceived(request_head)
    up, upstream = h.upstream()
    up.dataReceived(answer)
    if client_lost is not None:
        proto.connectionLost(client_lost)
    assert upstream.disconnecting
    assert len(pool_of(h)) == 0


def test_flow_control_is_handed_over() -> None:
    """
    A parked connection reads (so a close is seen) and throttles nobody; the
    client leg that takes it gets backpressure both ways.
    """
    h = Harness(pool=True)
    proto, client = h.client()
    proto.dataReceived(ONE_SHOT)
    up, upstream = h.upstream()
    assert client.producer is up
    assert upstream.producer is proto
    up.pauseProducing()  # the client's buffer is full
    assert upstream.producerState == "paused"
    up.dataReceived(OK)
    proto.connectionLost(DONE)
    assert len(pool_of(h)) == 1
    assert upstream.producerState == "producing"
    assert upstream.producer is None
    assert client.producer is None

    proto2, client2 = h.client()
    proto2.dataReceived(ONE_SHOT)
    assert client2.producer is up
    assert upstream.producer is proto2
    assert up.server is proto2


def test_kept_connections_give_way_to_clients() -> None:
    """
    Parked connections and client connections together stay within
    max_connections: a client beyond it closes the oldest parked connection
    (file descriptors are for clients first).
    """
    h = Harness(Limits(max_connections=3), pool=True)
    legs = one_shots_at_once(h, 2)
    assert len(pool_of(h)) == 2
    h.client()
    assert [t.disconnecting for _, t in legs] == [False, False]
    h.client()
    assert [t.disconnecting for _, t in legs] == [True, False]
    assert len(pool_of(h)) == 1
