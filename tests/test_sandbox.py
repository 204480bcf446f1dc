"""
The sandbox vendor's own data plane, in memory: it connects to targets
directly, as a vendor's exit does, and says so when one fails.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError, DNSLookupError, TimeoutError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from proxymap.credentials import basic_authorization
from proxymap.dataplane.names import HostCache
from proxymap.sandbox.release_api import ReleaseAPI
from proxymap.sandbox.vendor import SandboxVendor

AUTH = basic_authorization("demo-session-abc123", "demo")


def _lookup(host: str) -> Deferred[str]:
    if host.endswith(".invalid"):
        return fail(DNSLookupError(host))
    return Deferred()  # never answers


@pytest.mark.parametrize(
    "host, failure, status, text",
    [
        ("nowhere.invalid", None, b"502", b"cannot look up the target host nowhere.invalid"),
        # No DNS could hold it: failed at once, not after the connect timeout.
        ("a" * 64 + ".example", None, b"502", b"cannot look up the target host " + b"a" * 64),
        (
            "192.0.2.7",
            ConnectionRefusedError(),
            b"502",
            b"cannot connect to the target 192.0.2.7:80",
        ),
        ("192.0.2.7", TimeoutError(), b"504", b"timed out connecting to the target 192.0.2.7:80"),
    ],
)
def test_a_target_the_sandbox_cannot_reach_is_named_as_the_target(
    host: str, failure: Exception | None, status: bytes, text: bytes
) -> None:
    """
    The sandbox's peer is the origin, not an upstream proxy: its errors
    (and its log lines) must not send a newcomer looking for an upstream.
    """
    reactor = MemoryReactorClock()
    vendor = SandboxVendor(user="demo", password="demo")
    factory = vendor.factory(reactor)
    factory.tally.names = factory.names = HostCache(reactor, resolve=_lookup)
    conn = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    client = StringTransport()
    conn.makeConnection(client)
    conn.dataReceived(
        b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: %s\r\n\r\n"
        % (host.encode(), host.encode(), AUTH)
    )
    reactor.advance(0)
    if failure is not None:
        [(_, port, connector_factory, _, _)] = reactor.tcpClients
        assert port == 80
        connector_factory.clientConnectionFailed(None, Failure(failure))
    answer = client.value()
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert text in answer
    assert b"upstream" not in answer


def test_ip_sandbox_answers_head_with_the_head_alone() -> None:
    """
    A body after a HEAD answer would be read as the start of the next
    answer on the connection (proxymap drops such a kept connection and
    logs it: "sent more than its response").
    """
    vendor = SandboxVendor(user="demo", password="demo")
    conn = vendor.factory(MemoryReactorClock()).buildProtocol(
        IPv4Address("TCP", "127.0.0.1", 50000)
    )
    client = StringTransport()
    conn.makeConnection(client)
    request = (
        b"%s http://ip.sandbox/json HTTP/1.1\r\nHost: ip.sandbox\r\nProxy-Authorization: %s\r\n\r\n"
    )
    conn.dataReceived(request % (b"HEAD", AUTH) + request % (b"GET", AUTH))
    head, get = client.value().split(b"HTTP/1.1 ")[1:]
    assert head.startswith(b"200 OK\r\n") and head.endswith(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert get.startswith(b"200 OK\r\n")
    assert json.loads(get.split(b"\r\n\r\n", 1)[1])["requests"] == 2
    assert len(get.split(b"\r\n\r\n", 1)[1]) == length


def _put(
    api: ReleaseAPI, path: str, body: bytes, auth: tuple[str, str] = ("api", "api-secret")
) -> tuple[Any, Any]:
    """
    PUT ``body`` to the release API in memory; its response and JSON body.
    """
    stub = StubTreq(api)
    d = stub.put(f"http://vendor.test{path}", data=body, auth=auth)
    response: list[tuple[Any, bytes]] = []
    d.addCallback(lambda r: stub.content(r).addCallback(lambda c: response.append((r, c))))
    stub.flush()
    ((answer, content),) = response
    return answer, json.loads(content)


@pytest.mark.parametrize(
    "path, body, auth, status, error",
    [
        ("/sessions/nope/X", b"{}", ("api", "api-secret"), 404, "not found"),
        ("/sessions/release/X", b'{"releaseAll": true}', ("api", "wrong"), 401, "unauthorized"),
        ("/sessions/release/X", b'{"releaseAll": true}', ("", "api-secret"), 401, "unauthorized"),
        ("/sessions/release/X", b"{not json", ("api", "api-secret"), 400, "not JSON"),
        (
            "/sessions/release/X",
            b'{"data": [{"sessionId": "a"}]}',
            ("api", "api-secret"),
            400,
            "bad entry",
        ),
        ("/sessions/release/X", b'{"data": "a"}', ("api", "api-secret"), 400, "bad body"),
        ("/sessions/release/X", b"[]", ("api", "api-secret"), 400, "bad body"),
    ],
)
def test_the_release_api_refuses_what_geonodes_would(
    path: str, body: bytes, auth: tuple[str, str], status: int, error: str
) -> None:
    """
    The sandbox's release API answers a wrong path, wrong API credentials
    and a body it cannot read with an error and releases nothing, so a
    misconfigured ``[release]`` shows up against the sandbox as it would
    against the vendor.
    """
    vendor = SandboxVendor(api_user="api", api_password="api-secret")
    vendor.exit_for("a")
    answer, content = _put(ReleaseAPI(vendor), path, body, auth)
    assert (answer.code, content) == (status, {"success": False, "error": error})
    if status == 401:
        assert answer.headers.getRawHeaders("www-authenticate") == [
            'Basic realm="sandbox release API"'
        ]
    assert "a" in vendor.exits


def test_the_release_api_releases_a_whole_port() -> None:
    """
    An entry with a port and no session id releases every session: the
    sandbox has one port, as Geonode's release of a port does.
    """
    vendor = SandboxVendor(api_user="api", api_password="api-secret")
    vendor.exit_for("a")
    vendor.exit_for("b")
    answer, content = _put(ReleaseAPI(vendor), "/sessions/release/X", b'{"data": [{"port": 1}]}')
    assert (answer.code, content) == (200, {"success": True})
    assert vendor.exits == {}
