"""
TLS for what proxymap answers itself inside a local tunnel.

A CONNECT to a name proxymap answers itself (the Session API's domain, the
sandbox vendor's ``ip.sandbox``) opens a *local tunnel*: what the client
sends in it is for proxymap, not for a target.  A client asked for an
``https://`` URL (``curl -x http://127.0.0.1:10201 https://portmapper/session/``)
sends a TLS ClientHello there rather than a request head; proxymap then
answers in TLS (see ``ProxyServer``), with a self-signed certificate for
that name, made the first time a client needs it and kept for the life of
the process.

No public authority vouches for such a name, so a client must either skip
verification (``curl -k``) or trust the certificate itself
(:meth:`LocalCertificates.pem`).  The key is EC P-256: making one takes a
few milliseconds on the reactor, once per name.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from functools import partial
from typing import Any, Callable

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

#: Names a certificate is made for: a DNS name or an IPv4 address, as the
#: Session API's domain and the sandbox's host are.
_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")

#: A certificate is valid from a date long past (so no client clock is
#: behind it) and has "no well-defined expiration date" (RFC 5280, 4.1.2.5):
#: it lives only as long as the process that made it.
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)


@attrs.define
class LocalCertificates:
    """
    The self-signed certificates of the names answered in local tunnels,
    made on first use, one per name.
    """

    #: The certificate (PEM) and the TLS server options of each name.
    _made: dict[str, tuple[bytes, Any]] = attrs.field(factory=dict, init=False)

    def offer(self, name: str | None) -> Callable[[], Any] | None:
        """
        What a local tunnel to ``name`` offers its client: the TLS server
        options, made when (and only if) the client starts TLS; ``None`` when
        no certificate can be made for that name (the tunnel then speaks
        plain HTTP only).
        """
        if name is None:
            return None
        name = name.lower()
        if name.endswith("."):
            name = name[:-1]  # fully qualified: the same name, and certificates omit the dot
        if not _NAME.fullmatch(name):
            return None
        return partial(self.server_options, name)

    def server_options(self, name: str) -> Any:
        """
        The TLS server options (``startTLS``'s context factory) for ``name``.
        """
        return self._make(name.lower())[1]

    def pem(self, name: str) -> bytes:
        """
        The certificate of ``name`` in PEM, for clients that verify it.
        """
        return self._make(name.lower())[0]

    def _make(self, name: str) -> tuple[bytes, Any]:
        made = self._made.get(name)
        if made is None:
            pem, key_pem = _self_signed(name)
            made = self._made[name] = (pem, _ServerOptions(pem, key_pem))
        return made


@implementer(IOpenSSLContextFactory)
class _ServerOptions:
    """
    The TLS server side of a local tunnel: ``startTLS``'s context factory.

    The context is pyOpenSSL's own, not Twisted's ``CertificateOptions``:
    its ALPN must answer ``http/1.1`` (a client offering ``h2`` first, as
    curl does, must not be left to guess), and Twisted sets ALPN in ways that
    differ by version: 26 fails the handshake of a client offering ALPN to a
    server naming no protocol, 25 sets its callback on the shared context
    again for every connection, which pyOpenSSL 25 deprecates.
    """

    def __init__(self, pem: bytes, key_pem: bytes) -> None:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        # Recent pyOpenSSL takes cryptography's types and deprecates its
        # own; older (22.0, .ci/floor.txt) takes only its own.
        try:
            context.use_certificate(x509.load_pem_x509_certificate(pem))
        except TypeError:
            context.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, pem))
        try:
            context.use_privatekey(serialization.load_pem_private_key(key_pem, None))  # type: ignore[arg-type]
        except TypeError:
            context.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem))
        context.set_alpn_select_callback(_http11)
        self._context = context

    def getContext(self) -> SSL.Context:
        return self._context


def _http11(connection: SSL.Connection, offered: list[bytes]) -> Any:
    return b"http/1.1" if b"http/1.1" in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def _self_signed(name: str) -> tuple[bytes, bytes]:
    """
    A certificate for ``name`` and its key, both in PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    try:
        alternative: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        alternative = x509.DNSName(name)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem
