"""
The admin API's HTTP server: Twisted's ``Site``, with the bounds a service
port needs.

A stock ``Site`` reads a request body of any size before the application
sees it (to a temporary file past 100 KB) and takes any number of
connections.  On the admin port that would let a client, before it has
even authenticated, fill the disk with one upload or take the descriptors
the mapped ports need (the open-file limit keeps only a small reserve
beside them: :mod:`proxymap.ops.openfiles`).  So here:

- a body longer than :data:`MAX_BODY` is answered ``413`` as soon as its
  length is known (``Content-Length``, or the chunks read so far), without
  reading the rest, and the connection closes;
- at most :data:`MAX_CLIENTS` connections are open at once; the next one is
  answered ``503`` with ``Retry-After`` and closed;
- a connection idle for :data:`IDLE_TIMEOUT` seconds is closed (Twisted's
  default too, stated here so that it stays).
- a path or ``Host`` that is not UTF-8 once unquoted is answered ``400``
  here, where Klein would log a traceback for it.

Those answers are JSON like every other of the admin API.

Over TLS (``listen = "ssl:..."``) the site names HTTP/1.1 as its protocol
for ALPN: Twisted asks the wrapped factory, and with no answer its ALPN
callback picks nothing, which OpenSSL 3 turns into a failed handshake for
every client that offers ALPN (curl, browsers, urllib3).
"""

from __future__ import annotations

import json

from twisted.internet.interfaces import IAddress, IProtocolNegotiationFactory, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import implementer

from proxymap.dataplane.http import REASONS, simple_response

#: The largest request body read, in bytes.  The largest the API takes is a
#: release by port and session id of every port there can be: 65,535
#: entries of some 50-100 bytes each.
MAX_BODY = 8 * 1024 * 1024

#: Connections open at once; they come out of the open-file limit's reserve.
MAX_CLIENTS = 32

#: Seconds a connection may stay idle before it is closed.
IDLE_TIMEOUT = 60.0


def _error_body(error: str, description: str) -> bytes:
    """
    The body of an error, as the API writes every one.
    """
    return json.dumps({"error": error, "description": description}).encode() + b"\n"


def _answer(status: int, error: str, description: str, *extra: bytes) -> bytes:
    """
    A whole JSON error response that closes its connection, for answers
    given before (or instead of) the application.
    """
    body = _error_body(error, description)
    return simple_response(
        status,
        REASONS[status],
        body,
        content_type=b"application/json",
        extra=[b"Cache-Control: no-store", *extra],
    )


_TOO_LARGE = _answer(413, "content too large", f"request bodies are at most {MAX_BODY} bytes")
_NOT_UTF8 = _error_body("bad request", "the path and the host name must be UTF-8")
_BUSY = _answer(
    503,
    "busy",
    f"the admin API serves at most {MAX_CLIENTS} connections at once",
    b"Retry-After: 1",
)


class _BoundedRequest(Request):
    """
    A request whose body may not pass :data:`MAX_BODY`.
    """

    _refused = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > MAX_BODY:  # a chunked body, its length unknown ahead
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        """
        Answer 413 and close, reading nothing more.  The answer goes out
        first: the channel handles one request at a time, so nothing else
        is being written on this connection.
        """
        self._refused = True
        # Twisted answers "Expect: 100-continue" just after this; not now.
        self.requestHeaders.removeHeader(b"expect")
        channel = self.channel
        channel.transport.write(_TOO_LARGE)  # type: ignore[union-attr]  # connected
        channel.loseConnection()

    def render(self, resource: IResource) -> None:
        """
        Answer a path or host name that is not UTF-8 here, as the API
        answers bad requests.  Klein would answer ``400`` in text and log
        a traceback for each: any client, authenticated or not, could fill
        the log with them.
        """
        try:
            b"/".join((self.prepath or []) + (self.postpath or [])).decode("utf-8")
            self.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            self.setResponseCode(400)
            self.setHeader(b"content-type", b"application/json")
            self.setHeader(b"cache-control", b"no-store")
            self.setHeader(b"content-length", b"%d" % len(_NOT_UTF8))
            self.write(_NOT_UTF8)
            self.finish()
            return
        super().render(resource)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # The rest of a refused body may have come with the bytes that
        # overflowed it: answered already, the request goes no further.
        if not self._refused:
            super().requestReceived(command, path, version)


class _Busy(Protocol):
    """
    A connection beyond :data:`MAX_CLIENTS`: answered at once, then closed.
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(_BUSY)
        self.transport.loseConnection()


@implementer(IProtocolNegotiationFactory)
class AdminSite(WrappingFactory):
    """
    The admin API's listening factory: a ``Site`` for ``resource`` with the
    bounds above, its idle timeout kept on ``reactor``.
    """

    noisy = False

    def __init__(self, resource: IResource, reactor: IReactorTime) -> None:
        site = Site(resource, requestFactory=_BoundedRequest, timeout=IDLE_TIMEOUT, reactor=reactor)
        site.displayTracebacks = False
        site.noisy = False
        super().__init__(site)

    def acceptableProtocols(self) -> list[bytes]:
        """
        What the site speaks after a TLS handshake, for ALPN.
        """
        return [b"http/1.1"]

    def buildProtocol(self, addr: IAddress | None) -> Protocol:  # type: ignore[override]
        # One beyond the bound is answered unwrapped, so it is not counted.
        if len(self.protocols) >= MAX_CLIENTS:
            return _Busy()
        return super().buildProtocol(addr)
