"""
Upstream connections kept across client connections, on real sockets: curl
(one request per run, so one client connection per request) through
proxymap to a keep-alive vendor gateway that numbers its connections.
"""

from __future__ import annotations

import base64
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from proxymap.dataplane import flow
from proxymap.tap import ProxymapService

from ..helpers import delays_acks
from .conftest import curl
from .test_faults import eventually, proxymap_to

pytestmark = pytest.mark.integration


class Gateway(Protocol):
    """
    A keep-alive HTTP proxy gateway: answers each request with the number
    of the connection it came on and the session user it carried.  With
    ``drop_second`` it closes a connection, unanswered, at its second request
    (a vendor closing a kept connection just as it is used).
    """

    def __init__(self, vendor: KeepAliveVendor) -> None:
        self.vendor = vendor
        self.buffer = b""
        self.requests = 0

    def connectionMade(self) -> None:
        self.vendor.accepted += 1
        self.number = self.vendor.accepted
        self.vendor.live.add(self)

    def connectionLost(self, reason: object) -> None:
        self.vendor.live.discard(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        for _ in range(100):  # bounded: one request per turn
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
            length = int(fields.get(b"Content-Length", b"0"))
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.requests += 1
            if self.vendor.drop_second and self.requests == 2:
                self.transport.loseConnection()
                return
            auth = fields[b"Proxy-Authorization"].split(b" ", 1)[1]
            user = base64.b64decode(auth).split(b":", 1)[0]
            body = b"%d %s %s" % (self.number, user, head.split(b" ", 1)[0])
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )


class KeepAliveVendor:
    def __init__(self, drop_second: bool = False) -> None:
        self.drop_second = drop_second
        self.accepted = 0
        self.live: set[Gateway] = set()
        self.port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: Gateway(self)), interface="127.0.0.1"
        )

    @property
    def number(self) -> int:
        return self.port.getHost().port


async def through(port: int, *args: str) -> tuple[int, bytes]:
    code, out, err = await curl("-x", f"http://127.0.0.1:{port}", *args)
    assert code == 0, err
    return code, out


async def stop(service: ProxymapService, vendor: KeepAliveVendor) -> None:
    await service.stopService()
    await eventually(lambda: not vendor.live, "every vendor connection closed")
    await vendor.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_one_shot_clients_reuse_one_vendor_connection() -> None:
    vendor = KeepAliveVendor()
    service, port = proxymap_to(vendor.number)
    try:
        answers = [(await through(port, "http://e.com/"))[1] for _ in range(3)]
        user = answers[0].split()[1]
        assert user.startswith(b"alice-session-")
        assert answers == [b"1 %s GET" % user] * 3
        assert vendor.accepted == 1
        assert service.tally.pool is not None and service.tally.pool.reused == 2
        # A request with a body does not take a kept connection.
        _, out = await through(port, "-d", "x=1", "http://e.com/form")
        assert out == b"2 %s POST" % user
    finally:
        await stop(service, vendor)


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="Linux only")
@pytest_twisted.ensureDeferred
async def test_a_connection_kept_a_while_goes_back_to_interactive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    Taken again after an idle spell, the kept connection's own socket is
    switched back to delayed ACKs (read back from the kernel as the
    switch is made, before any answer), and serves as before.
    """
    states: list[bool] = []
    real = flow.interactive

    def interactive(transport: Any) -> None:
        real(transport)
        states.append(delays_acks(transport.getHandle()))

    monkeypatch.setattr("proxymap.dataplane.upstream.flow.interactive", interactive)
    vendor = KeepAliveVendor()
    service, port = proxymap_to(vendor.number)
    try:
        _, first = await through(port, "http://e.com/")
        await deferLater(reactor, 0.1, lambda: None)  # well past flow.INTERACTIVE_GAP
        _, second = await through(port, "http://e.com/")
        assert first.split()[0] == second.split()[0] == b"1"
        assert vendor.accepted == 1
        assert states == [True]
    finally:
        await stop(service, vendor)


@pytest_twisted.ensureDeferred
async def test_a_kept_connection_the_vendor_closed_is_retried_unseen() -> None:
    vendor = KeepAliveVendor(drop_second=True)
    service, port = proxymap_to(vendor.number)
    try:
        _, first = await through(port, "http://e.com/")
        _, second = await through(port, "http://e.com/")
        assert first.split()[0] == b"1"
        assert second.split()[0] == b"2"
        assert service.tally.pool is not None and service.tally.pool.retried == 1
    finally:
        await stop(service, vendor)


@pytest_twisted.ensureDeferred
async def test_a_new_session_never_uses_the_old_ones_connection() -> None:
    vendor = KeepAliveVendor()
    service, port = proxymap_to(vendor.number, {"session_api": {"enabled": True}})
    try:
        _, first = await through(port, "http://e.com/")
        assert len(vendor.live) == 1
        _, out = await through(port, "http://portmapper/session/new")
        assert b'"session_id"' in out
        await eventually(lambda: not vendor.live, "the old session's connection closed")
        _, second = await through(port, "http://e.com/")
        assert second.split()[0] == b"2"
        assert second.split()[1] != first.split()[1]
    finally:
        await stop(service, vendor)


@pytest_twisted.ensureDeferred
async def test_kept_connections_close_after_the_idle_timeout() -> None:
    vendor = KeepAliveVendor()
    service, port = proxymap_to(vendor.number, idle_upstream_timeout="200ms")
    try:
        await through(port, "http://e.com/")
        assert len(vendor.live) == 1
        await eventually(lambda: not vendor.live, "the kept connection expired")
        _, out = await through(port, "http://e.com/")
        assert out.split()[0] == b"2"
    finally:
        await stop(service, vendor)
