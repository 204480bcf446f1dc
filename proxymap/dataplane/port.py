"""
A mapped port: the factory that ties the data plane to the session registry.

Every request through the port is sent to the mapping's upstream with the
credentials of the port's session *current at that moment*; the session is
also the key under which upstream connections are reused, so after a
rotation no request travels over a connection of the old session.
"""

from __future__ import annotations

import hmac
from typing import Any

from proxymap.config import Limits, MappingConfig
from proxymap.credentials import parse_basic_authorization
from proxymap.dataplane.gatewaytls import client_options
from proxymap.dataplane.http import HTTPError, Request
from proxymap.dataplane.server import (
    LocalResponse,
    ProxyFactory,
    ProxyServer,
    SocksRoute,
    Tally,
    UpstreamTarget,
)
from proxymap.sessionapi import SessionAPI, addressed_to_api
from proxymap.sessions import SessionRegistry

_CHALLENGE = [b'Proxy-Authenticate: Basic realm="proxymap"']


class PortFactory(ProxyFactory):
    """
    The factory of one mapped port.
    """

    def __init__(
        self,
        reactor: Any,
        registry: SessionRegistry,
        port: int,
        mapping: MappingConfig,
        session_api: SessionAPI | None = None,
        limits: Limits | None = None,
        tally: Tally | None = None,
    ) -> None:
        super().__init__(reactor, mapping.connect_timeout, limits, tally)
        self.registry = registry
        self.port = port
        self.mapping = mapping
        #: The address the port listens on: the mapping's, unless a reload
        #: that moved the mapping could not move this port (see the tap).
        self.bind = mapping.bind
        self.session_api = session_api or SessionAPI(registry)
        self.protocols = mapping.protocols
        #: The target of the current session: one object per session, not per request.
        self._target: UpstreamTarget | None = None

    @property
    def socks_auth_required(self) -> bool:  # type: ignore[override]
        return bool(self.mapping.client_users)

    def socks_credentials_ok(self, username: str, password: str) -> bool:
        return not self.mapping.client_users or self._known_client(username, password)

    def _known_client(self, username: str, password: str) -> bool:
        """
        Constant-time check against every configured client user.
        """
        ok = False
        for user, secret in self.mapping.client_users:
            same_user = hmac.compare_digest(user.encode(), username.encode())
            same_password = hmac.compare_digest(secret.value.encode(), password.encode())
            ok |= same_user and same_password
        return ok

    def _authenticated(self, request: Request, conn: ProxyServer) -> bool:
        if conn.local_tunnel:  # its CONNECT was authenticated
            return True
        header = request.proxy_authorization
        if header is None and request.host is None:
            # Origin-form requests (the Session API with an empty domain)
            # may carry ordinary Authorization instead.
            for line in request.lines:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"authorization":
                    header = value.strip()
        credentials = parse_basic_authorization(header) if header else None
        return credentials is not None and self._known_client(*credentials)

    def intercept(self, request: Request, conn: ProxyServer) -> LocalResponse | None:
        """
        Check client credentials (when the mapping has client users), then
        answer Session API requests; everything else goes upstream.
        """
        if self.mapping.client_users and not self._authenticated(request, conn):
            raise HTTPError(407, "this proxy needs client credentials", _CHALLENGE)
        if addressed_to_api(request, conn, self.mapping.session_api):
            return self.session_api.handle(request, self.port)
        return None

    def target(self, request: Request, conn: ProxyServer) -> UpstreamTarget:
        session = self.registry.current(self.port)
        upstream = self.mapping.upstream
        if upstream.scheme == "socks5":
            assert request.host is not None
            return UpstreamTarget(
                host=upstream.host,
                port=upstream.port,
                # A SOCKS connection is bound to one target.
                key=(session, request.host, request.port),
                via_proxy=False,
                session=session,
                socks=SocksRoute(
                    username=session.username,
                    password=session.password,
                    host=request.host,
                    port=request.port,
                    resolve_locally=self.mapping.socks_resolve == "local",
                ),
            )
        cached = self._target
        if cached is not None and cached.session is session:
            return cached
        tls = None
        if upstream.scheme == "https":
            tls = client_options(upstream.host, self.mapping.upstream_ca)
        self._target = UpstreamTarget(
            host=upstream.host,
            port=upstream.port,
            key=session,
            authorization=session.authorization,
            via_proxy=True,
            session=session,
            tls=tls,
        )
        return self._target

    def forget_target(self) -> None:
        """
        Drop the cached target (the mapping changed).
        """
        self._target = None
