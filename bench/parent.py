#!/usr/bin/env python3
"""
The terminal fake parent: an upstream proxy that checks Basic credentials,
counts requests per username, answers absolute-URI requests itself with a tiny
body, honours Connection: close, and echoes CONNECT tunnels.

    python bench/parent.py PORT USER PASSWORD

On SIGTERM it prints the per-username counts as JSON (the stickiness check:
port P must only ever have sent P's session username) and exits.
"""

from __future__ import annotations

import base64
import json
import signal
import sys
from collections import Counter

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
OK_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
DENIED = b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
COUNTS: Counter[str] = Counter()
USER = PASSWORD = ""


class Parent(Protocol):
    buffer = b""
    tunnel = False

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel:
            self.transport.write(data)
            return
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            username = _username(head)
            if username is None:
                self.transport.write(DENIED)
                self.transport.loseConnection()
                return
            COUNTS[username] += 1
            if head.startswith(b"CONNECT "):
                self.tunnel = True
                self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if self.buffer:
                    self.transport.write(self.buffer)
                return
            if b"\r\nconnection: close" in head.lower():
                self.transport.write(OK_CLOSE)
                self.transport.loseConnection()
                return
            self.transport.write(OK)


def _username(head: bytes) -> str | None:
    start = head.find(b"\r\nProxy-Authorization: Basic ")
    if start < 0:
        return None
    start += 29
    end = head.find(b"\r\n", start)
    try:
        user, _, password = (
            base64.b64decode(head[start : end if end > 0 else None]).decode().partition(":")
        )
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
