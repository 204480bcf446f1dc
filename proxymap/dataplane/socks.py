"""
SOCKS5 (RFC 1928, RFC 1929) and SOCKS4/4a handshakes, server side.

A mapped port tells the dialect from a connection's first byte (0x05, 0x04,
anything else is HTTP).  The handshake here only parses and answers; a
successful CONNECT becomes a :class:`SocksConnect`, which the data plane
turns into the same CONNECT request an HTTP client would have sent, so
sessions, the upstream leg and the admin API treat both alike.

Parsers are fed bytes and never raise on bad input: they answer with the
protocol's refusal and ask for the connection to close.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

import attrs

from proxymap.dataplane.http import error_kind

SOCKS5 = 5
SOCKS4 = 4

# SOCKS5 reply codes (RFC 1928 section 6).
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08

NO_AUTH = 0x00
USERNAME_PASSWORD = 0x02
NO_ACCEPTABLE_METHOD = 0xFF

#: Longest SOCKS4 user id or host name accepted (before the NUL).
MAX_SOCKS4_FIELD = 255


@attrs.frozen
class SocksConnect:
    """
    A client's CONNECT: where to, and the credentials it gave (if any).
    """

    version: int
    host: str
    port: int
    username: str | None = None
    password: str | None = None


@attrs.frozen
class Step:
    """
    What a handshake wants after some bytes: ``reply`` to write, then either
    wait for more, ``close``, or go on with ``connect`` (and ``rest``, the
    bytes after the handshake).
    """

    reply: bytes = b""
    connect: SocksConnect | None = None
    rest: bytes = b""
    close: bool = False


def socks5_reply(code: int) -> bytes:
    """
    A SOCKS5 reply; the bound address is not meaningful for a proxy and is zero.
    """
    return bytes((SOCKS5, code, 0, 1, 0, 0, 0, 0, 0, 0))


def socks4_reply(granted: bool) -> bytes:
    return bytes((0, 0x5A if granted else 0x5B, 0, 0, 0, 0, 0, 0))


class Socks5Handshake:
    """
    RFC 1928 greeting, optional RFC 1929 username/password, and the request.

    ``require_auth``: only username/password is acceptable.  Otherwise "no
    authentication" is preferred, and username/password is accepted too (its
    credentials are handed on, for the port's policy to use or ignore).
    """

    def __init__(
        self, require_auth: bool = False, check: Callable[[str, str], bool] | None = None
    ) -> None:
        self.require_auth = require_auth
        #: Judges username/password in the RFC 1929 step (a refusal closes).
        self.check = check
        self._buffer = b""
        self._state = "greeting"
        self._username: str | None = None
        self._password: str | None = None

    def feed(self, data: bytes) -> Step:
        self._buffer += data
        replies = b""
        while True:
            step = getattr(self, "_" + self._state)()
            if step is None:  # need more bytes
                return Step(reply=replies)
            replies += step.reply
            if step.close or step.connect is not None:
                return Step(reply=replies, connect=step.connect, rest=step.rest, close=step.close)

    def _greeting(self) -> Step | None:
        buf = self._buffer
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return None
        methods = set(buf[2 : 2 + buf[1]])
        self._buffer = buf[2 + buf[1] :]
        if buf[0] != SOCKS5:
            return Step(close=True)
        if USERNAME_PASSWORD in methods and (self.require_auth or NO_AUTH not in methods):
            self._state = "auth"
            return Step(reply=bytes((SOCKS5, USERNAME_PASSWORD)))
        if NO_AUTH in methods and not self.require_auth:
            self._state = "request"
            return Step(reply=bytes((SOCKS5, NO_AUTH)))
        return Step(reply=bytes((SOCKS5, NO_ACCEPTABLE_METHOD)), close=True)

    def _auth(self) -> Step | None:
        buf = self._buffer
        if len(buf) < 2 or len(buf) < 3 + buf[1]:
            return None
        ulen = buf[1]
        plen = buf[2 + ulen]
        if len(buf) < 3 + ulen + plen:
            return None
        if buf[0] != 0x01:
            return Step(reply=b"\x01\x01", close=True)
        self._username = buf[2 : 2 + ulen].decode("utf-8", "replace")
        self._password = buf[3 + ulen : 3 + ulen + plen].decode("utf-8", "replace")
        self._buffer = buf[3 + ulen + plen :]
        if self.check is not None and not self.check(self._username, self._password):
            return Step(reply=b"\x01\x01", close=True)
        self._state = "request"
        return Step(reply=b"\x01\x00")

    def _request(self) -> Step | None:
        buf = self._buffer
        if len(buf) < 5:
            return None
        version, command, _, atyp = buf[0], buf[1], buf[2], buf[3]
        if version != SOCKS5:
            return Step(reply=socks5_reply(GENERAL_FAILURE), close=True)
        if atyp == 1:
            end = 4 + 4
        elif atyp == 3:
            end = 5 + buf[4]
        elif atyp == 4:
            end = 4 + 16
        else:
            return Step(reply=socks5_reply(ADDRESS_TYPE_NOT_SUPPORTED), close=True)
        if len(buf) < end + 2:
            return None
        if atyp == 1:
            host = str(ipaddress.IPv4Address(buf[4:8]))
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(buf[4:20]))
        else:
            try:
                host = buf[5:end].decode("ascii")
            except UnicodeDecodeError:
                return Step(reply=socks5_reply(HOST_UNREACHABLE), close=True)
            if not host or (any(c in host for c in " /\\@:\x00") and not is_ip_address(host, 6)):
                return Step(reply=socks5_reply(HOST_UNREACHABLE), close=True)
        (port,) = struct.unpack("!H", buf[end : end + 2])
        rest = buf[end + 2 :]
        self._buffer = b""
        if command != 1:  # BIND and UDP ASSOCIATE are not offered
            return Step(reply=socks5_reply(COMMAND_NOT_SUPPORTED), close=True)
        if port == 0:
            return Step(reply=socks5_reply(HOST_UNREACHABLE), close=True)
        return Step(
            connect=SocksConnect(SOCKS5, host, port, self._username, self._password), rest=rest
        )


def is_ip_address(host: str, version: int | None = None) -> bool:
    """
    Whether ``host`` is an IP address literal (of ``version``, if given).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return version is None or address.version == version


class Socks4Handshake:
    """
    SOCKS4 (IPv4 addresses) and SOCKS4a (host names after 0.0.0.x).
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> Step:
        self._buffer += data
        buf = self._buffer
        if len(buf) < 9:
            return Step()
        version, command = buf[0], buf[1]
        (port,) = struct.unpack("!H", buf[2:4])
        address = buf[4:8]
        user_end = buf.find(b"\x00", 8)
        if user_end == -1:
            if len(buf) > 8 + MAX_SOCKS4_FIELD:
                return Step(reply=socks4_reply(False), close=True)
            return Step()
        user = buf[8:user_end].decode("utf-8", "replace")
        end = user_end + 1
        if address[:3] == b"\x00\x00\x00" and address[3] != 0:  # SOCKS4a
            host_end = buf.find(b"\x00", end)
            if host_end == -1:
                if len(buf) > end + MAX_SOCKS4_FIELD:
                    return Step(reply=socks4_reply(False), close=True)
                return Step()
            try:
                host = buf[end:host_end].decode("ascii")
            except UnicodeDecodeError:
                return Step(reply=socks4_reply(False), close=True)
            end = host_end + 1
            if not host:
                return Step(reply=socks4_reply(False), close=True)
        else:
            host = str(ipaddress.IPv4Address(address))
        rest = buf[end:]
        self._buffer = b""
        if version != SOCKS4 or command != 1 or port == 0:
            return Step(reply=socks4_reply(False), close=True)
        return Step(connect=SocksConnect(SOCKS4, host, port, user or None, None), rest=rest)


def socks5_code(status: int, message: str) -> int:
    """
    The SOCKS5 reply for a failure the data plane reports as an HTTP status.
    """
    kind = error_kind(status, message)
    if kind == "timeout":
        return TTL_EXPIRED
    if kind == "unreachable":
        return CONNECTION_REFUSED
    if status == 403:
        return NOT_ALLOWED
    if kind == "refused":
        return HOST_UNREACHABLE
    return GENERAL_FAILURE
