"""
A small HTTP/1.1 origin for integration tests, plain or TLS.

- ``GET /bytes/N``: N bytes, streamed with a push producer.
- ``PUT|POST /count[?pause=S]``: after stalling S seconds, reads the body
  (Content-Length or chunked) and answers ``{"received": N}``.
- anything else: JSON echo of what arrived (method, path, header lines, and
  whether a Proxy-Authorization reached the origin).
- A connection whose first bytes are ``ECHO`` gets every byte back.
- A connection whose first bytes are ``HALFCLOSE`` reads until EOF, then
  answers how many bytes it got and closes (for half-close tests).
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from proxymap.dataplane.http import ChunkedFramer, HTTPError, LengthFramer, parse_request_head

BLOCK = b"\x00" * (256 * 1024)


@implementer(IPushProducer)
class _Source:
    def __init__(self, proto: OriginProtocol, remaining: int) -> None:
        self.proto = proto
        self.remaining = remaining
        self.paused = False

    def resumeProducing(self) -> None:
        self.paused = False
        transport = self.proto.transport
        while not self.paused and self.remaining:
            n = min(self.remaining, len(BLOCK))
            self.remaining -= n
            transport.write(BLOCK if n == len(BLOCK) else BLOCK[:n])
        if not self.remaining:
            transport.unregisterProducer()
            self.proto.source = None

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.remaining = 0


@implementer(IHalfCloseableProtocol)
class OriginProtocol(Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.body: LengthFramer | ChunkedFramer | None = None
        self.received = 0
        self.source: _Source | None = None
        self.halfclose: int | None = None
        self.keep_alive = True
        self.echo = False

    def dataReceived(self, data: bytes) -> None:
        if self.halfclose is not None:
            self.halfclose += len(data)
            return
        if not self.buffer and self.body is None and data.startswith(b"HALFCLOSE"):
            self.halfclose = len(data)
            return
        if self.echo or (not self.buffer and self.body is None and data.startswith(b"ECHO")):
            self.echo = True
            self.transport.write(data)
            return
        if self.body is not None:
            n = self.body.feed(data)
            self.received += n
            data = data[n:]
            if self.body.done:
                self.body = None
                self._reply(200, json.dumps({"received": self.received}).encode())
        self.buffer += data
        while self.body is None and b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            try:
                request = parse_request_head(head)
            except HTTPError:
                self.transport.loseConnection()
                return
            self._handle(request)
            if self.body is not None and self.buffer:
                rest, self.buffer = self.buffer, b""
                self.dataReceived(rest)

    def _handle(self, request: Any) -> None:
        self.keep_alive = request.keep_alive
        path = request.path.decode()
        if path.startswith("/bytes/"):
            n = int(path.rsplit("/", 1)[1])
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                b"Content-Type: application/octet-stream\r\n\r\n" % n
            )
            self.source = _Source(self, n)
            self.transport.registerProducer(self.source, True)
            self.source.resumeProducing()
        elif request.has_body:
            if b"pause=" in request.path:
                # Stall before reading the body, as a slow server would.
                seconds = float(request.path.rsplit(b"pause=", 1)[1])
                self.transport.pauseProducing()
                from twisted.internet import reactor

                reactor.callLater(seconds, self.transport.resumeProducing)
            self.received = 0
            self.body = ChunkedFramer() if request.chunked else LengthFramer(request.content_length)
        else:
            self._reply(
                200,
                json.dumps(
                    {
                        "method": request.method.decode(),
                        "path": path,
                        "headers": [line.decode("latin-1") for line in request.lines],
                        "proxy_authorization": request.proxy_authorization is not None,
                    }
                ).encode(),
            )

    def _reply(self, status: int, body: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(body), body)
        )
        if not self.keep_alive:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        if self.halfclose is not None:
            self.transport.write(b"got %d bytes" % self.halfclose)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()


class OriginFactory(Factory):
    protocol = OriginProtocol
    noisy = False


def self_signed_certificate() -> tuple[bytes, bytes]:
    """
    A certificate for localhost and 127.0.0.1 and its key, both PEM.
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    # allowed: certificate validity, not app time
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
