"""
Client authentication, limits and timeouts on a mapped port, in memory.
"""

from __future__ import annotations

import pytest

from proxymap.config import ConfigError, Limits, parse_config
from proxymap.credentials import basic_authorization
from proxymap.dataplane import socks

from .helpers import Harness, creds, head_of, header
from .test_socks import s4a_request, s5_request

GET = b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
WORKER = {"worker": "w0rker-pw"}


def with_auth(extra: bytes = b"", user: str = "worker", password: str = "w0rker-pw") -> bytes:
    return extra + b"Proxy-Authorization: " + basic_authorization(user, password) + b"\r\n"


# ---------------------------------------------------------------- client authentication


def test_http_clients_must_authenticate() -> None:
    h = Harness(client_users=WORKER)
    for request in (
        GET + b"\r\n",
        GET + with_auth(password="nope") + b"\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
    ):
        proto, client = h.client()
        proto.dataReceived(request)
        first, lines, _ = head_of(client.value())
        assert first == b"HTTP/1.1 407 Proxy Authentication Required"
        assert header(lines, b"proxy-authenticate") == [b'Basic realm="proxymap"']
    assert h.reactor.tcpClients == []
    proto, client = h.client()
    proto.dataReceived(GET + with_auth() + b"\r\n")
    _, upstream = h.upstream()
    # The client's credentials stay here; the vendor gets the session's.
    assert header(head_of(upstream.value())[1], b"proxy-authorization") == [creds("sess0001")]
    assert b"w0rker-pw" not in upstream.value()


def test_session_api_requires_it_too() -> None:
    h = Harness(client_users=WORKER, session_api={"enabled": True, "domain": "portmapper"})
    proto, client = h.client()
    proto.dataReceived(b"GET http://portmapper/session/ HTTP/1.1\r\n\r\n")
    assert head_of(client.value())[0].startswith(b"HTTP/1.1 407")
    proto, client = h.client()
    proto.dataReceived(b"GET http://portmapper/session/ HTTP/1.1\r\n" + with_auth() + b"\r\n")
    assert head_of(client.value())[0] == b"HTTP/1.1 200 OK"
    h = Harness(client_users=WORKER, session_api={"enabled": True, "domain": ""})
    proto, client = h.client()
    proto.dataReceived(
        b"GET /session/ HTTP/1.1\r\nAuthorization: "
        + basic_authorization("worker", "w0rker-pw")
        + b"\r\n\r\n"
    )
    assert head_of(client.value())[0] == b"HTTP/1.1 200 OK"


def test_a_tunnel_to_the_session_api_is_authenticated_once() -> None:
    """
    ``curl -p -x http://worker:pw@...`` sends its credentials with the
    CONNECT alone: a tunnel to the API's domain needs them there, and the
    requests inside it (which a client cannot add proxy credentials to)
    are the tunnel's.  A SOCKS5 client authenticates at its handshake.
    """
    h = Harness(client_users=WORKER, session_api={"enabled": True, "domain": "portmapper"})
    connect = b"CONNECT portmapper:80 HTTP/1.1\r\nHost: portmapper:80\r\n"
    inside = b"GET /session/ HTTP/1.1\r\nHost: portmapper\r\n\r\n"
    proto, client = h.client()
    proto.dataReceived(connect + b"\r\n")
    assert head_of(client.value())[0].startswith(b"HTTP/1.1 407")
    proto, client = h.client()
    proto.dataReceived(connect + with_auth() + b"\r\n")
    assert client.value() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    for _ in range(2):
        client.clear()
        proto.dataReceived(inside)
        first, _, body = head_of(client.value())
        assert first == b"HTTP/1.1 200 OK" and b'"session_id"' in body
    proto, client = h.client()
    proto.dataReceived(b"\x05\x01\x02\x01\x06worker\x09w0rker-pw" + s5_request("portmapper", 80))
    client.clear()
    proto.dataReceived(inside)
    assert head_of(client.value())[0] == b"HTTP/1.1 200 OK"
    assert h.reactor.tcpClients == []


def test_socks_clients_must_authenticate() -> None:
    h = Harness(client_users=WORKER)
    proto, client = h.client()
    proto.dataReceived(b"\x05\x01\x00")
    assert client.value() == b"\x05\xff" and client.disconnecting
    proto, client = h.client()
    proto.dataReceived(b"\x05\x01\x02\x01\x06worker\x04nope")
    assert client.value() == b"\x05\x02\x01\x01" and client.disconnecting
    proto, client = h.client()
    proto.dataReceived(s4a_request("example.com", 80, b"worker"))
    assert client.value() == socks.socks4_reply(False)
    proto, client = h.client()
    proto.dataReceived(b"\x05\x01\x02\x01\x06worker\x09w0rker-pw" + s5_request("e.com", 443))
    assert client.value() == b"\x05\x02\x01\x00"
    assert h.reactor.tcpClients[-1][:2] == ("192.0.2.10", 10000)


@pytest.mark.parametrize("bind", ["0.0.0.0", "192.0.2.10", "::"])
def test_no_open_proxy_on_a_public_interface(bind: str) -> None:
    raw = {"ports": "1", "upstream": "http://h:1", "bind": bind}
    with pytest.raises(ConfigError) as e:
        parse_config({"mapping": [raw]}, env={})
    assert str(e.value).startswith(f"mapping[0].bind: the ports would be an open proxy on {bind}")
    assert parse_config({"mapping": [{**raw, "open_proxy": True}]}, env={}).mappings
    users = parse_config({"mapping": [{**raw, "client_users": WORKER}]}, env={})
    assert users.mappings[0].client_users[0][0] == "worker"


# ---------------------------------------------------------------- timeouts


def test_slow_head_gets_408_and_others_are_unaffected() -> None:
    h = Harness(Limits(head_timeout=10, idle_timeout=300))
    slow, slow_client = h.client()
    slow.dataReceived(b"GET http://example.com/ HTTP/1.1\r\nX-Slow: ")
    h.reactor.advance(5)
    slow.dataReceived(b"a")  # a trickle does not extend the deadline
    fast, fast_client = h.client()
    fast.dataReceived(GET + b"\r\n")
    h.reactor.advance(5)
    assert head_of(slow_client.value())[0] == b"HTTP/1.1 408 Request Timeout"
    assert slow_client.disconnecting
    up, _ = h.upstream()
    up.dataReceived(OK)
    assert fast_client.value().endswith(b"ok") and not fast_client.disconnecting


def test_idle_keep_alive_connection_closes_quietly() -> None:
    h = Harness(Limits(idle_timeout=60))
    proto, client = h.client()
    proto.dataReceived(GET + b"\r\n")
    up, _ = h.upstream()
    up.dataReceived(OK)
    h.reactor.advance(59)
    assert not client.disconnecting
    h.reactor.advance(1)
    assert client.disconnecting and client.value().endswith(b"ok")


def test_black_holed_vendor_gives_504() -> None:
    h = Harness(Limits(idle_timeout=60))
    proto, client = h.client()
    proto.dataReceived(GET + b"\r\n")
    _, upstream = h.upstream()
    h.reactor.advance(60)
    assert head_of(client.value())[0] == b"HTTP/1.1 504 Gateway Timeout"
    assert upstream.disconnecting


def test_idle_tunnel_is_closed_but_a_busy_one_is_not() -> None:
    h = Harness(Limits(tunnel_idle_timeout=100, head_timeout=30))
    proto, client = h.client()
    proto.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    up, upstream = h.upstream()
    up.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    for _ in range(5):  # traffic every 60 s keeps it alive
        h.reactor.advance(60)
        up.dataReceived(b"x")
    assert not client.disconnected
    h.reactor.advance(100)
    assert client.disconnected and upstream.disconnected


def test_silent_socks_client_is_dropped() -> None:
    h = Harness(Limits(head_timeout=10))
    proto, client = h.client()
    proto.dataReceived(b"\x05")
    h.reactor.advance(10)
    assert client.disconnecting


# ---------------------------------------------------------------- connection limits


def test_connections_per_port_and_in_total() -> None:
    h = Harness(Limits(max_connections_per_port=2, max_connections=3))
    first = [h.client(10201) for _ in range(2)]
    proto, client = h.client(10201)
    proto.dataReceived(GET + b"\r\n")
    assert head_of(client.value())[0] == b"HTTP/1.1 503 Service Unavailable"
    assert client.disconnecting and h.reactor.tcpClients == []
    h.client(10202)  # the third in total
    proto, client = h.client(10203)
    proto.dataReceived(b"\x05\x01\x00")
    assert client.value() == b"\x05\xff"
    proto, client = h.client(10203)
    proto.dataReceived(s4a_request("e.com", 80))
    assert client.value() == socks.socks4_reply(False)
    # A closed connection frees its place.
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    first[0][0].connectionLost(Failure(ConnectionDone()))
    proto, client = h.client(10201)
    proto.dataReceived(GET + b"\r\n")
    assert client.value() == b""
    assert len(h.reactor.tcpClients) == 1
    assert h.tally.connections == 3


def test_header_limits_are_configurable() -> None:
    h = Harness(Limits(max_headers=3, max_head_size=1024))
    proto, client = h.client()
    proto.dataReceived(GET + b"A: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    assert head_of(client.value())[0].startswith(b"HTTP/1.1 431")
    proto, client = h.client()
    proto.dataReceived(GET + b"X: " + b"a" * 2000)
    assert head_of(client.value())[0].startswith(b"HTTP/1.1 431")


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_head_size": 10}, "limits.max_head_size: must be at least 1024 bytes"),
        ({"max_connections": 0}, "limits.max_connections: must be at least 1"),
        ({"head_timeout": "soon"}, "limits.head_timeout: 'soon' is not a duration"),
        ({"speed": 1}, "limits.speed: unknown key"),
        ({"max_idle_upstreams": -1}, "limits.max_idle_upstreams: must be 0 (none) or more"),
        ({"max_idle_upstreams": "many"}, "limits.max_idle_upstreams: expected"),
        ({"idle_upstream_timeout": 0}, "limits.idle_upstream_timeout: must be greater than zero"),
    ],
)
def test_limits_config_errors(limits: dict[str, object], message: str) -> None:
    raw = {"ports": "1", "upstream": "http://h:1"}
    with pytest.raises(ConfigError) as e:
        parse_config({"mapping": [raw], "limits": limits}, env={})
    assert str(e.value).startswith(message)


def test_limits_parse() -> None:
    raw = {"ports": "1", "upstream": "http://h:1"}
    c = parse_config(
        {"mapping": [raw], "limits": {"idle_timeout": "2m", "max_headers": 50}}, env={}
    )
    assert (c.limits.idle_timeout, c.limits.max_headers, c.limits.head_timeout) == (120, 50, 30)
    assert (c.limits.max_idle_upstreams, c.limits.idle_upstream_timeout) == (2048, 30)
    c = parse_config(
        {"mapping": [raw], "limits": {"max_idle_upstreams": 0, "idle_upstream_timeout": "5s"}},
        env={},
    )
    assert (c.limits.max_idle_upstreams, c.limits.idle_upstream_timeout) == (0, 5)


def test_idle_tunnel_timer_waits_for_the_tunnel_deadline() -> None:
    """
    An idle tunnel is looked at again at its own deadline, not every
    head_timeout: thousands of idle tunnels cost no timer churn.
    """
    h = Harness(Limits(tunnel_idle_timeout=1000, head_timeout=30))
    proto, client = h.client()
    proto.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    up, _ = h.upstream()
    up.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    h.reactor.advance(30)  # the handshake's timer fires and finds a tunnel
    assert proto.timer_due == 1000
    h.reactor.advance(969)
    assert not client.disconnected
    h.reactor.advance(1)
    assert client.disconnected
