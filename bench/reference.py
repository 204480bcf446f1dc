#!/usr/bin/env python3
"""
The bare Twisted reference: the smallest Twisted program doing proxymap's hot
path, as the practical ceiling of this architecture.  Each port has a fixed
session username; every request head gets that port's Proxy-Authorization
injected and goes to the parent over one upstream connection per client
connection; responses flow back untouched; CONNECT is spliced with
producer/consumer backpressure.

    python bench/reference.py FIRST_PORT COUNT PARENT_PORT USER PASSWORD
"""

from __future__ import annotations

import base64
import sys

from twisted.internet import reactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol


class Upstream(Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.client.transport, True)
        self.client.transport.registerProducer(self.transport, True)
        self.client.upstream = self
        if self.client.pending:
            self.transport.write(b"".join(self.client.pending))
            self.client.pending = []

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason: object) -> None:
        self.client.transport.loseConnection()


class Client(Protocol):
    upstream: Upstream | None = None
    tunnel = False

    def connectionMade(self) -> None:
        self.pending: list[bytes] = []
        self.buffer = b""
        factory = ClientFactory()
        factory.protocol = lambda: Upstream(self)  # type: ignore[assignment]
        reactor.connectTCP("127.0.0.1", self.factory.parent, factory)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel:
            self._send(data)
            return
        self.buffer += data
        out = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            line_end = self.buffer.find(b"\r\n")
            out.append(
                self.buffer[: line_end + 2]
                + self.factory.auth  # type: ignore[attr-defined]
                + self.buffer[line_end + 2 : end + 4]
            )
            if self.buffer.startswith(b"CONNECT "):
                self.tunnel = True
                out.append(self.buffer[end + 4 :])
                self.buffer = b""
                break
            self.buffer = self.buffer[end + 4 :]
        if out:
            self._send(b"".join(out))

    def _send(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason: object) -> None:
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


def main() -> None:
    first, count, parent = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    user, password = sys.argv[4], sys.argv[5]
    for port in range(first, first + count):
        factory = Factory.forProtocol(Client)
        factory.noisy = False
        factory.parent = parent  # type: ignore[attr-defined]
        token = base64.b64encode(f"{user}-session-p{port}:{password}".encode())
        factory.auth = b"Proxy-Authorization: Basic " + token + b"\r\n"  # type: ignore[attr-defined]
        reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=1024)
    reactor.run()


if __name__ == "__main__":
    main()
