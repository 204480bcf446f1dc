"""
The in-band Session API: a worker sees, resets or renews the sticky session
of *the port its request arrived on*, through the proxy itself::

    curl -x http://127.0.0.1:10201 http://portmapper/session/        # see it
    curl -x http://127.0.0.1:10201 http://portmapper/session/reset   # drop it
    curl -x http://127.0.0.1:10201 http://portmapper/session/new     # replace it now

The endpoints and their JSON are those of the reference product's Session API,
so scripts written for it work unchanged.  Requests reach the API when:

- the domain is set and a request's target host is the domain (any port,
  any case, with or without the trailing dot of a fully qualified name),
  or a CONNECT to the domain opened a local tunnel on the connection and
  the request travels in it, in plain HTTP or, when the client starts TLS
  there, in HTTPS with a self-signed certificate for the domain
  (localtls.py);
- the domain is empty and the request is in origin form, sent straight to the
  port (``curl http://127.0.0.1:10201/session/``) whatever its Host says.

API requests are answered here: they never go upstream and do not count as
proxied traffic.  The routing runs in :meth:`PortFactory.intercept
<proxymap.dataplane.port.PortFactory.intercept>`, after any client
authentication the port requires, so the API requires it too.
"""

from __future__ import annotations

import json
import re
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs

import attrs
from twisted.logger import Logger

from proxymap.config import SessionAPIConfig
from proxymap.dataplane.http import REASONS, TUNNEL_OPEN, Request, simple_response
from proxymap.dataplane.localtls import LocalCertificates
from proxymap.dataplane.server import LocalResponse, ProxyServer
from proxymap.sessions import InvalidParameter, Session, SessionRegistry

log = Logger()

# path -> (action, allowed methods)
_ROUTES: dict[bytes, tuple[str, tuple[bytes, ...]]] = {
    b"/session": ("show", (b"GET", b"HEAD")),
    b"/session/reset": ("reset", (b"GET", b"POST")),
    b"/session/new": ("new", (b"GET", b"POST")),
}


# RFC 3986, 2.3: these are the same character escaped or not (6.2.2.2).
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def _unescape_unreserved(match: re.Match[bytes]) -> bytes:
    byte = int(match.group(1), 16)
    return bytes((byte,)) if byte in _UNRESERVED else match.group(0)


def normalized_path(path: bytes) -> bytes:
    """
    ``path`` with its escaped unreserved characters unescaped (``/%73ession``
    is ``/session``), the others kept (``%2F`` is not a separator), and
    trailing slashes dropped but for the root.
    """
    if b"%" in path:
        path = _ESCAPE.sub(_unescape_unreserved, path)
    if len(path) > 1:
        path = path.rstrip(b"/")
    return path


def http_date(timestamp: float) -> str:
    """
    An RFC 1123 date in GMT: ``Wed, 10 Jun 2026 16:09:43 GMT``.
    """
    return formatdate(timestamp, usegmt=True)


def addressed_to_api(request: Request, conn: ProxyServer, config: SessionAPIConfig) -> bool:
    """
    Whether ``request`` on ``conn`` is for the Session API under ``config``.
    """
    if not config.enabled:
        return False
    if conn.local_tunnel:
        return True
    if config.domain:
        host = request.host
        if host is None:
            return False
        host = host.lower()
        if host == config.domain:
            return True
        # "portmapper." is the same name, written fully qualified.
        return host.endswith(".") and host[:-1] == config.domain
    return request.host is None


@attrs.frozen
class SessionAPI:
    """
    Answers Session API requests for the ports of one registry.
    """

    registry: SessionRegistry
    #: Certificates for API requests made over HTTPS in a local tunnel.
    certificates: LocalCertificates = attrs.field(factory=LocalCertificates)

    def handle(self, request: Request, port: int) -> LocalResponse:
        """
        Answer an API request that arrived on ``port``.
        """
        if request.method == b"CONNECT":
            tls = self.certificates.offer(request.host)
            return LocalResponse(TUNNEL_OPEN, tunnel=True, tls=tls)
        path, _, query = request.path.split(b"#", 1)[0].partition(b"?")
        path = normalized_path(path)
        route = _ROUTES.get(path)
        if route is None:
            return self._error(
                404,
                "not found",
                "Session API endpoints: GET /session/, GET|POST /session/reset, "
                "GET|POST /session/new",
                request,
            )
        action, methods = route
        if request.method not in methods:
            allow = ", ".join(m.decode() for m in methods)
            return self._error(
                405,
                "method not allowed",
                f"{path.decode()} accepts {allow}",
                request,
                [b"Allow: " + allow.encode()],
            )
        if action == "show":
            return self._session(self.registry.current(port), request)
        if action == "new":
            params = {
                name: values[-1]
                for name, values in parse_qs(
                    query.decode("utf-8", "replace"), keep_blank_values=True
                ).items()
            }
            old = self.registry.peek(port)
            try:
                session = self.registry.renew(port, params)
            except InvalidParameter as e:
                return self._error(400, "bad parameter", str(e), request)
            # A tunnel cannot change session (see SessionRegistry.close_tunnels).
            closed = self.registry.close_tunnels(old) if old is not None else 0
            log.info(
                "session API renewed port {port}: {session_id} ({closed} tunnels closed)",
                port=port,
                session_id=session.id,
                closed=closed,
            )
            return self._session(session, request)
        ended = self.registry.reset(port)
        closed = self.registry.close_tunnels(ended) if ended is not None else 0
        log.info(
            "session API reset port {port} ({closed} tunnels closed)", port=port, closed=closed
        )
        return self._json(
            200, {"success": True, "ended_session_id": ended.id if ended else None}, request
        )

    def describe(self, session: Session) -> dict[str, Any]:
        """
        The JSON object of a session: the reference product's three fields
        (``session_id``, ``expires_at``, ``expired``) first, then extras.
        """
        now = self.registry.clock.seconds()
        return {
            "session_id": session.id,
            "expires_at": http_date(session.expires),
            "expired": not session.live or session.expires <= now,
            "port": session.port,
            "mapping": session.mapping,
            "created_at": http_date(session.created),
            "seconds_left": max(0.0, round(session.expires - now, 3)),
            "lifetime": session.lifetime,
            "params": {name: value for name, value in session.params.items() if value},
        }

    def _session(self, session: Session, request: Request) -> LocalResponse:
        headers = [
            b"X-Session-Id: " + session.id.encode(),
            b"X-Expires-At: " + http_date(session.expires).encode(),
        ]
        return self._json(200, self.describe(session), request, headers)

    def _error(
        self,
        status: int,
        error: str,
        description: str,
        request: Request,
        headers: list[bytes] | None = None,
    ) -> LocalResponse:
        return self._json(status, {"error": error, "description": description}, request, headers)

    def _json(
        self,
        status: int,
        body: dict[str, Any],
        request: Request,
        headers: list[bytes] | None = None,
    ) -> LocalResponse:
        data = json.dumps(body).encode() + b"\n"
        response = simple_response(
            status,
            REASONS.get(status, "OK"),
            data,
            b"application/json",
            close=False,
            extra=[*(headers or []), b"Cache-Control: no-store"],
        )
        # A HEAD request's body is dropped where the answer is written.
        return LocalResponse(response, close=not request.keep_alive)
