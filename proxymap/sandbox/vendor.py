"""
The sandbox vendor: a loopback HTTP proxy that behaves like a sticky
residential gateway, so proxymap can be seen working with no vendor account
and no internet.

- It requires ``Proxy-Authorization: Basic <user>-session-<id>[-key-value...]:<pass>``
  and answers 407 otherwise.
- Each session id gets a stable fake exit address from 198.18.0.0/15 (the
  benchmarking range, never routed).
- ``http://ip.sandbox/`` (any path) is answered by the sandbox itself with
  JSON naming the exit address, the session id and the parameters it saw:
  ``curl -x http://127.0.0.1:10201 http://ip.sandbox/json``.  So is every
  request in a tunnel to ``ip.sandbox`` (a CONNECT or a SOCKS CONNECT, on any
  port), as the session that opened the tunnel; in HTTPS when the client
  starts TLS there, with a self-signed certificate for ``ip.sandbox``
  (``curl -k -x http://127.0.0.1:10201 https://ip.sandbox/json``).
- Anything else is forwarded to the real target, plain HTTP and CONNECT.

It runs on the same data plane as proxymap's ports, with a policy that
authenticates and connects to origins directly.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import random
from collections import Counter, deque
from typing import Any

import attrs

from proxymap.config import Limits
from proxymap.credentials import basic_authorization, parse_basic_authorization
from proxymap.dataplane.http import TUNNEL_OPEN, HTTPError, Request, simple_response
from proxymap.dataplane.localtls import LocalCertificates
from proxymap.dataplane.server import LocalResponse, ProxyFactory, ProxyServer, UpstreamTarget

#: The virtual host the sandbox answers itself.
SANDBOX_HOST = "ip.sandbox"
EXIT_NETWORK = ipaddress.ip_network("198.18.0.0/15")
_CHALLENGE = [b'Proxy-Authenticate: Basic realm="proxymap sandbox"']


@attrs.frozen
class Identity:
    """
    Who a request says it is: the full username, the session id and any
    ``-key-value`` parameters around it.
    """

    username: str
    session: str
    params: dict[str, str]


@attrs.define
class SandboxVendor:
    """
    The sandbox's state: its credentials, the exits it handed out and what it saw.
    """

    user: str = "demo"
    password: str = attrs.field(default="demo-secret", repr=False)
    rng: random.Random = attrs.field(factory=random.Random, repr=False)
    #: Exit address of every session id seen.
    exits: dict[str, str] = attrs.field(factory=dict)
    #: Requests and tunnels seen, by full username.
    usernames: Counter[str] = attrs.field(factory=Counter)
    #: The last requests seen: (username, method, target).
    seen: deque[tuple[str, str, str]] = attrs.field(factory=lambda: deque(maxlen=1000))
    #: Credentials of the release API (proxymap.sandbox.release_api), separate
    #: from the proxy credentials as at real vendors.
    api_user: str = "api"
    api_password: str = attrs.field(default="api-secret", repr=False)
    #: Release API calls received: method, path, API user, body.
    release_calls: list[dict[str, Any]] = attrs.field(factory=list)
    #: The certificate of ip.sandbox, for tunnels to it that start TLS.
    certificates: LocalCertificates = attrs.field(factory=LocalCertificates, repr=False)

    def authenticate(self, header: bytes | None) -> Identity:
        """
        Check a ``Proxy-Authorization`` value.

        :raises HTTPError: 407 when it is missing, malformed or wrong.
        """
        credentials = parse_basic_authorization(header) if header else None
        if credentials is None:
            raise HTTPError(407, "the sandbox needs Basic proxy credentials", _CHALLENGE)
        username, password = credentials
        prefix = self.user + "-"
        ok = hmac.compare_digest(password.encode(), self.password.encode())
        if not ok or not username.startswith(prefix):
            raise HTTPError(407, "wrong sandbox user or password", _CHALLENGE)
        tokens = username[len(prefix) :].split("-")
        if len(tokens) % 2:
            raise HTTPError(
                407, "the username must be <user>-session-<id>[-key-value...]", _CHALLENGE
            )
        params = dict(zip(tokens[::2], tokens[1::2]))  # even: checked above
        session = params.pop("session", "")
        if not session or not all(c.isalnum() or c == "_" for c in session):
            raise HTTPError(407, "the username has no valid session-<id>", _CHALLENGE)
        return Identity(username=username, session=session, params=params)

    def exit_for(self, session: str) -> str:
        """
        The exit address of a session id, handed out on first sight.
        """
        address = self.exits.get(session)
        if address is None:
            used = set(self.exits.values())
            size = EXIT_NETWORK.num_addresses
            for _ in range(64):
                candidate = str(EXIT_NETWORK[self.rng.randrange(1, size - 1)])
                if candidate not in used:
                    break
            address = self.exits[session] = candidate
        return address

    def release(self, session: str) -> bool:
        """
        Forget a session id: if it comes back it gets a new exit.
        """
        return self.exits.pop(session, None) is not None

    def record(self, identity: Identity, request: Request) -> None:
        self.usernames[identity.username] += 1
        self.seen.append(
            (identity.username, request.method.decode("latin-1"), request.target.decode("latin-1"))
        )

    def answer(self, identity: Identity) -> bytes:
        """
        What ``ip.sandbox`` answers a request of ``identity`` (to ``HEAD``
        as well: the data plane drops the body then).
        """
        body = {
            "ip": self.exit_for(identity.session),
            "session": identity.session,
            "username": identity.username,
            "params": identity.params,
            "requests": self.usernames[identity.username],
        }
        data = json.dumps(body).encode() + b"\n"
        return simple_response(200, "OK", data, b"application/json", close=False)

    def factory(self, reactor: Any, connect_timeout: float = 10.0) -> SandboxFactory:
        return SandboxFactory(reactor, self, connect_timeout)


#: A stand-in vendor caps nothing that proxymap's own limits should be tested by.
SANDBOX_LIMITS = Limits(max_connections_per_port=1_000_000, max_connections=1_000_000)


class SandboxConnection(ProxyServer):
    """
    A client connection of the sandbox: who opened its tunnel to
    ``ip.sandbox``, if it did.
    """

    __slots__ = ("identity",)

    def __init__(self) -> None:
        super().__init__()
        #: The identity of the CONNECT to ip.sandbox; the requests that
        #: follow in its tunnel carry no credentials of their own.
        self.identity: Identity | None = None


class SandboxFactory(ProxyFactory):
    """
    The sandbox's listening port.
    """

    protocol = SandboxConnection
    #: SOCKS5 clients must give <user>-session-<id>:<pass>, like HTTP ones.
    socks_auth_required = True

    def __init__(self, reactor: Any, vendor: SandboxVendor, connect_timeout: float) -> None:
        super().__init__(reactor, connect_timeout, SANDBOX_LIMITS)
        self.vendor = vendor

    def socks_credentials_ok(self, username: str, password: str) -> bool:
        try:
            self.vendor.authenticate(basic_authorization(username, password))
        except HTTPError:
            return False
        return True

    def intercept(self, request: Request, conn: ProxyServer) -> LocalResponse | None:
        assert isinstance(conn, SandboxConnection)
        identity = conn.identity
        if identity is None:  # not in a tunnel to ip.sandbox
            if request.host is None or request.host.lower() != SANDBOX_HOST:
                return None
            identity = self.vendor.authenticate(request.proxy_authorization)
        self.vendor.record(identity, request)
        if request.method == b"CONNECT" and conn.identity is None:
            conn.identity = identity
            return LocalResponse(
                TUNNEL_OPEN, tunnel=True, tls=self.vendor.certificates.offer(SANDBOX_HOST)
            )
        return LocalResponse(self.vendor.answer(identity))

    def target(self, request: Request, conn: ProxyServer) -> UpstreamTarget:
        identity = self.vendor.authenticate(request.proxy_authorization)
        self.vendor.record(identity, request)
        assert request.host is not None
        return UpstreamTarget(
            host=request.host,
            port=request.port,
            key=(request.host, request.port),
            via_proxy=False,
        )
