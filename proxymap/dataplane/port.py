"""
A mapped port: the factory that ties the data plane to the session registry.

Every request through the port is sent to the mapping's upstream with the
credentials of the port's session *current at that moment*; the session is
also the key under which upstream connections are reused, so after a
rotation no request travels over a connection of the old session.
"""

from __future__ import annotations

from typing import Any

from proxymap.config import MappingConfig
from proxymap.dataplane.http import Request
from proxymap.dataplane.server import (
    LocalResponse,
    ProxyFactory,
    ProxyServer,
    SocksRoute,
    UpstreamTarget,
)
from proxymap.sessionapi import SessionAPI, addressed_to_api
from proxymap.sessions import SessionRegistry


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
    ) -> None:
        super().__init__(reactor, connect_timeout=mapping.connect_timeout)
        self.registry = registry
        self.port = port
        self.mapping = mapping
        self.session_api = session_api or SessionAPI(registry)
        self.protocols = mapping.protocols

    def intercept(self, request: Request, conn: ProxyServer) -> LocalResponse | None:
        """
        Answer Session API requests; everything else goes upstream.
        """
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
        return UpstreamTarget(
            host=upstream.host,
            port=upstream.port,
            key=session,
            authorization=session.authorization,
            via_proxy=True,
            session=session,
        )

    def describe(self) -> str:
        return f"{self.mapping.name} port {self.port}"
