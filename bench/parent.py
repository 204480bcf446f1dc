#!/usr/bin/env python3
"""
The terminal fake parent: an upstream proxy that checks Basic credentials,
counts requests per username, answers absolute-URI GETs itself (a tiny body, or
N bytes for ``/bytes/N``), honours Connection: close, and answers CONNECT by
the target's port: 7 echoes, 9 discards, 19 is an endless byte source
(chargen), anything else is this same small HTTP server.

    python bench/parent.py PORT USER PASSWORD

``GET http://parent.counts/`` (with credentials) answers the per-username
counts since the last such request, and resets them.  On SIGTERM it prints the
counts as JSON (the stickiness check:
port P must only ever have sent P's session username) and exits.
"""

from __future__ import annotations

import base64
import json
import signal
import sys
from collections import Counter

from twisted.internet import reactor
from twisted.internet.interfaces import IPullProducer, ITransport
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
OK_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
DENIED = b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
COUNTS: Counter[str] = Counter()
USER = PASSWORD = ""


CHUNK = b"x" * (256 * 1024)


@implementer(IPullProducer)
class Chargen:
    """
    An endless source, paced by the transport: a chunk each time it drains.
    """

    def __init__(self, transport: ITransport) -> None:
        self.transport = transport

    def resumeProducing(self) -> None:
        self.transport.write(CHUNK)

    def stopProducing(self) -> None:
        pass


class Parent(Protocol):
    buffer = b""
    tunnel: str | None = None
    # The last Proxy-Authorization value this connection sent and whose
    # user it named: a kept connection sends the same one every time.
    last_auth = b""
    last_user: str | None = None

    def send(self, data: bytes) -> None:
        """
        ``transport.write``, but straight to the socket when nothing is
        queued: Twisted's write waits a loop turn and two epoll changes, and
        the parent shares its core with the load, so its cost is the rig's.
        """
        transport = self.transport
        if not (transport.dataBuffer or transport._tempDataLen or transport.disconnecting):
            try:
                sent = transport.socket.send(data)
            except OSError:  # would block, or an error Twisted's write will meet
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def user(self, head: bytes) -> str | None:
        auth = _auth(head)
        if auth is None:
            return None
        if auth != self.last_auth:
            self.last_auth, self.last_user = auth, _username(auth)
        return self.last_user

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel == "echo":
            self.transport.write(data)
            return
        if self.tunnel in ("discard", "chargen"):
            return
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            if self.tunnel is None:  # a proxy request; inside a tunnel: plain HTTP
                username = self.user(head)
                if username is None:
                    self.transport.write(DENIED)
                    self.transport.loseConnection()
                    return
                if head.startswith(b"GET http://parent.counts/ "):
                    self.transport.write(_counts())
                    continue
                COUNTS[username] += 1
            if head.startswith(b"CONNECT ") and self.tunnel is None:
                self._tunnel(head)
                return
            body = _body(head)
            if b"\r\nconnection: close" in head.lower():
                self.send(_response(body, close=True))
                self.transport.loseConnection()
                return
            self.send(OK if body is None else _response(body, close=False))

    def _tunnel(self, head: bytes) -> None:
        target = head.split(b" ", 2)[1]
        port = target.rpartition(b":")[2]
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if port == b"19":
            self.tunnel = "chargen"
            self.transport.registerProducer(Chargen(self.transport), False)
        elif port == b"9":
            self.tunnel = "discard"
        elif port == b"7":
            self.tunnel = "echo"
            if self.buffer:
                self.transport.write(self.buffer)
        else:  # a small HTTP server inside the tunnel
            self.tunnel = "http"
            if self.buffer:
                rest, self.buffer = self.buffer, b""
                self.dataReceived(rest)


def _counts() -> bytes:
    """
    The per-username counts since the last look, as a JSON response; resets
    them, so the harness can check stickiness phase by phase.
    """
    body = json.dumps(dict(COUNTS)).encode()
    COUNTS.clear()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def _body(head: bytes) -> bytes | None:
    """
    ``None`` for the tiny default body, or N bytes for ``GET .../bytes/N``.
    """
    target = head.split(b" ", 2)[1]
    _, marker, size = target.rpartition(b"/bytes/")
    if marker and size.isdigit() and int(size) <= 1 << 30:
        return CHUNK[:1] * int(size)
    return None


def _response(body: bytes | None, close: bool) -> bytes:
    if body is None:
        return OK_CLOSE if close else OK
    return (
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n"
        % (len(body), b"Connection: close\r\n" if close else b"")
    ) + body


def _auth(head: bytes) -> bytes | None:
    """
    The Basic credentials of ``head``'s Proxy-Authorization, still encoded.
    """
    start = head.find(b"\r\nProxy-Authorization: Basic ")
    if start < 0:  # field names are case-insensitive (Node sends them lowercase)
        start = head.lower().find(b"\r\nproxy-authorization: basic ")
        if start < 0:
            return None
    start += 29
    end = head.find(b"\r\n", start)
    return head[start : end if end > 0 else None]


def _username(auth: bytes) -> str | None:
    """
    The user named by Basic credentials ``auth``, if the password is right
    and the user a session of the configured one.
    """
    try:
        user, _, password = base64.b64decode(auth).decode().partition(":")
    except ValueError:
        return None
    if password != PASSWORD or not user.startswith(USER + "-session-"):
        return None
    return user


def main() -> None:
    global USER, PASSWORD
    port, USER, PASSWORD = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    factory = Factory.forProtocol(Parent)
    factory.noisy = False
    reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=1024)

    def report(signum: int, frame: object) -> None:
        print(json.dumps(dict(COUNTS)), flush=True)
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, report)
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    main()
