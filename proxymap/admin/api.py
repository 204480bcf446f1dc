"""
The admin API, a Klein application served on its own port.

Routes are methods of :class:`AdminAPI`, which holds the registry and the
mapped ports' factories; it never touches the global reactor (time comes from
the registry's clock).  Errors of every kind (ours, Werkzeug's 404/405, auth,
unexpected failures) leave through one translation block as JSON
``{"error": ..., "description": ...}``.
"""

from __future__ import annotations

import functools
import hmac
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import BaseConverter

from proxymap.admin import views
from proxymap.admin.openapi import openapi_document
from proxymap.config import Secret
from proxymap.credentials import parse_basic_authorization
from proxymap.dataplane.port import PortFactory
from proxymap.dataplane.server import ProxyServer
from proxymap.sessions import EndReason, InvalidParameter, Session, SessionRegistry

if TYPE_CHECKING:
    from proxymap.ops.metrics import Metrics

log = Logger()

_REALM = b'Basic realm="proxymap admin"'


class APIError(Exception):
    """
    An error answer: status, short error, long description, extra headers.
    """

    def __init__(
        self,
        status: int,
        error: str,
        description: str,
        headers: dict[bytes, bytes] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(status, error, description)
        self.status = status
        self.error = error
        self.description = description
        self.headers = headers or {}
        self.extra = extra or {}


class ReleaseError(APIError):
    """
    A bad release request: answered with ``"success": false`` like the vendors' API.
    """

    def __init__(self, description: str, status: int = 400) -> None:
        error = "not found" if status == 404 else "bad request"
        super().__init__(status, error, description, extra={"success": False})


class SessionIdConverter(BaseConverter):
    """
    A session id in a path: any segment but ``release``, which names
    ``/sessions/release`` (so its ``Allow`` is exactly ``PUT``).  Generated
    ids of the default length (8) can never be ``release``.
    """

    regex = "(?!release$)[^/]+"


def write_json(request: IRequest, value: Any, status: int = 200) -> bytes:
    """
    The one JSON response helper.
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value).encode() + b"\n"


def _arg(request: IRequest, name: str) -> str | None:
    values = (request.args or {}).get(name.encode())
    if not values:
        return None
    return values[-1].decode("utf-8", "replace")


def _route(
    app: Klein,
    path: str,
    methods: tuple[str, ...] = ("GET",),
    params: tuple[str, ...] = (),
    open_if: str = "",
) -> Callable[[Callable[..., Any]], Any]:
    """
    A Klein route whose handler runs only for an authenticated request that
    uses no query parameter but ``params`` (a misspelt one is an error, not
    silently ignored).
    """

    def decorator(handler: Callable[..., Any]) -> Any:
        @functools.wraps(handler)
        def authenticated(self: AdminAPI, request: IRequest, **kwargs: Any) -> Any:
            if not (open_if and getattr(self, open_if)):
                self.authenticate(request)
            for name in request.args or {}:
                if name.decode("utf-8", "replace") not in params:
                    shown = name.decode("utf-8", "replace")[:40]
                    known = ", ".join(params) or "none"
                    raise APIError(
                        400, "bad request", f"unknown parameter {shown!r} (known: {known})"
                    )
            return handler(self, request, **kwargs)

        return app.route(path, methods=list(methods), strict_slashes=False)(authenticated)

    return decorator


@attrs.define(slots=False, eq=False)
class AdminAPI:
    """
    The admin API over a registry and its ports.
    """

    registry: SessionRegistry
    factories: dict[int, PortFactory]
    users: tuple[tuple[str, Secret], ...] = ()
    #: Prometheus metrics, and the service's health (ok, details).
    metrics: Metrics | None = None
    health: Callable[[], tuple[bool, dict[str, Any]]] | None = None
    health_open: bool = False
    #: Sessions ended with a grace (``DELETE ...?ttl=``) whose connections
    #: are draining: id -> (session, timer).
    _closing: dict[str, tuple[Session, IDelayedCall]] = attrs.field(factory=dict, init=False)

    app: ClassVar[Klein] = Klein()
    app.url_map.converters["session"] = SessionIdConverter
    # Werkzeug would answer a path with "//" in it (/sessions/%2F decoded)
    # with a redirect raised as an exception Klein does not handle: a 500.
    # Unmerged, such a path matches no route and is the 404 it should be.
    app.url_map.merge_slashes = False

    # ------------------------------------------------------------ plumbing

    def authenticate(self, request: IRequest) -> None:
        """
        Check HTTP Basic credentials against the configured users (in
        constant time); without users the API is loopback-only by config.
        """
        if not self.users:
            return
        header = request.getHeader(b"authorization")
        given = parse_basic_authorization(header) if header else None
        name, password = given if given is not None else ("", "")
        ok = False
        for user, secret in self.users:
            same_user = hmac.compare_digest(user.encode(), name.encode())
            same_password = hmac.compare_digest(secret.value.encode(), password.encode())
            ok |= same_user and same_password
        if not ok:
            raise APIError(
                401,
                "unauthorized",
                "this API needs HTTP Basic credentials of an admin user",
                {b"www-authenticate": _REALM},
            )

    @app.handle_errors(APIError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, APIError)
        for name, value in error.headers.items():
            request.setHeader(name, value)
        body = {**error.extra, "error": error.error, "description": error.description}
        return write_json(request, body, error.status)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return write_json(
            request,
            {
                "error": "not found",
                "description": f"no such resource: {request.path.decode()}"
                " (GET /openapi.json lists them)",
            },
            404,
        )

    @app.handle_errors(MethodNotAllowed)
    def _not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = sorted(failure.value.valid_methods or [])  # type: ignore[union-attr]
        request.setHeader(b"allow", ", ".join(allowed).encode())
        return write_json(
            request,
            {
                "error": "method not allowed",
                "description": f"{request.method.decode()} is not allowed here; "
                f"use {', '.join(allowed)}",
            },
            405,
        )

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("admin API request {path} failed", failure, path=request.path)
        return write_json(
            request, {"error": "internal error", "description": "see the proxymap log"}, 500
        )

    # ------------------------------------------------------------ helpers

    @property
    def now(self) -> float:
        return self.registry.clock.seconds()

    def _view(self, session: Session) -> dict[str, Any]:
        return views.session_view(session, self.factories[session.port], self.now)

    def _find(self, session_id: str) -> Session:
        session = self.registry.get(session_id)
        if session is None:
            raise APIError(404, "not found", f"no session {session_id!r}")
        return session

    def _factory(self, port: int) -> PortFactory:
        factory = self.factories.get(port)
        if factory is None:
            raise APIError(404, "not found", f"port {port} is not mapped")
        return factory

    @staticmethod
    def _parameters(request: IRequest, known: tuple[str, ...]) -> tuple[Any, Any]:
        try:
            fields = views.parse_fields(_arg(request, "fields"), known)
            window = views.parse_range(_arg(request, "range"))
        except views.BadParameter as e:
            raise APIError(400, "bad request", str(e)) from None
        return fields, window

    def cancel_pending(self) -> None:
        """
        Cancel grace timers (at shutdown).
        """
        for _, timer in self._closing.values():
            if timer.active():
                timer.cancel()
        self._closing.clear()

    # ------------------------------------------------------------ sessions

    @_route(app, "/sessions", params=("fields", "range", "port", "state"))
    def list_sessions(self, request: IRequest) -> bytes:
        fields, window = self._parameters(request, views.SESSION_FIELDS)
        items = [self._view(session) for session in self.registry.list()]
        port = _arg(request, "port")
        if port is not None:
            if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
                raise APIError(400, "bad request", "port: expected a port number (1-65535)")
            items = [item for item in items if item["port"] == int(port)]
        state = _arg(request, "state")
        if state is not None:
            if state not in views.SESSION_STATES:
                raise APIError(400, "bad request", "state: expected active or idle")
            items = [item for item in items if item["state"] == state]
        return write_json(request, views.collection(items, fields, window))

    @_route(app, "/sessions/<session:session_id>", params=("fields",))
    def get_session(self, request: IRequest, session_id: str) -> bytes:
        fields, _ = self._parameters(request, views.SESSION_FIELDS)
        return write_json(request, views.select(self._view(self._find(session_id)), fields))

    @_route(app, "/sessions/<session:session_id>/connections", params=("fields", "range"))
    def session_connections(self, request: IRequest, session_id: str) -> bytes:
        fields, window = self._parameters(request, views.CONNECTION_FIELDS)
        session = self._find(session_id)
        now = self.now
        conns = sorted(session.connections, key=lambda c: c.id)
        items = [views.connection_view(c, now) for c in conns if isinstance(c, ProxyServer)]
        return write_json(request, views.collection(items, fields, window))

    @_route(app, "/sessions/<session:session_id>", methods=("DELETE",), params=("ttl",))
    def close_session(self, request: IRequest, session_id: str) -> bytes:
        ttl_arg = _arg(request, "ttl")
        ttl = 0.0
        if ttl_arg is not None:
            try:
                ttl = float(ttl_arg)
            except ValueError:
                ttl = -1
            if not 0 <= ttl <= 86400:
                raise APIError(400, "bad request", "ttl: expected seconds from 0 to 86400")
        if session_id in self._closing:
            # Deleted already and draining: DELETE is idempotent, and this one
            # cuts the grace short.
            session, timer = self._closing.pop(session_id)
            if timer.active():
                timer.cancel()
            self._abort(session)
        elif ttl:
            session = self._find(session_id)
            self.registry.end(session_id, EndReason.CLOSED)
            timer = self.registry.clock.callLater(ttl, self._grace_over, session_id)
            self._closing[session_id] = (session, timer)
        else:
            self._find(session_id)
            self.registry.close(session_id, EndReason.CLOSED)
        log.info(
            "admin API closed session {session_id} (grace {ttl}s)", session_id=session_id, ttl=ttl
        )
        request.setResponseCode(204)
        return b""

    def _grace_over(self, session_id: str) -> None:
        session, _ = self._closing.pop(session_id)
        self._abort(session)

    @staticmethod
    def _abort(session: Session) -> None:
        for conn in list(session.connections):
            conn.abort()

    # ------------------------------------------------------------ release

    @_route(app, "/sessions/release", methods=("PUT",))
    def release(self, request: IRequest) -> bytes:
        return self._release(request, None)

    @_route(app, "/sessions/release/<string:mapping>", methods=("PUT",))
    def release_mapping(self, request: IRequest, mapping: str) -> bytes:
        if not any(f.mapping.name == mapping for f in self.factories.values()):
            raise ReleaseError(f"no mapping named {mapping!r}", 404)
        return self._release(request, mapping)

    def _release(self, request: IRequest, mapping: str | None) -> bytes:
        """
        Release sessions by port, by port and session id, or all: the body
        shapes of the vendors' release API, where ``port`` is a local port.
        Everything is checked before anything is released.
        """
        try:
            body = json.loads(request.content.read() or b"null")
        except ValueError:
            raise ReleaseError("the body is not JSON") from None
        if not isinstance(body, dict):
            raise ReleaseError('expected {"data": [{"port": ...}]} or {"releaseAll": true}')
        unknown = set(body) - {"data", "releaseAll"}
        if unknown:
            raise ReleaseError(f"unknown key {sorted(unknown)[0]!r}")
        release_all = body.get("releaseAll", False)
        if not isinstance(release_all, bool):
            raise ReleaseError("releaseAll must be true or false")
        ports = [
            port
            for port, f in self.factories.items()
            if mapping is None or f.mapping.name == mapping
        ]
        targets: list[tuple[int, str | None]] = []
        if "data" in body:
            data = body["data"]
            if not isinstance(data, list) or not data:
                raise ReleaseError("data must be a non-empty list of {port, sessionId}")
            for index, entry in enumerate(data):
                where = f"data[{index}]"
                if not isinstance(entry, dict) or set(entry) - {"port", "sessionId"}:
                    raise ReleaseError(f"{where}: expected {{port, sessionId}}")
                port = entry.get("port")
                if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                    raise ReleaseError(f"{where}.port: expected a port number (1-65535)")
                session_id = entry.get("sessionId")
                if "sessionId" in entry and not isinstance(session_id, str):
                    raise ReleaseError(f"{where}.sessionId: expected a string")
                targets.append((port, session_id))
        if release_all:
            # "All" includes whatever data lists as well.
            targets = [(port, None) for port in ports]
        # {} or {"releaseAll": false}: nothing asked, nothing released.

        released = []
        for port, session_id in targets:
            # A port that is not ours (or not the mapping's) has no session to release.
            session = self.registry.peek(port) if port in ports else None
            if session is None or (session_id is not None and session.id != session_id):
                continue
            self.registry.close(session.id, EndReason.RELEASED)
            released.append({"port": port, "sessionId": session.id})
        log.info("admin API released {count} sessions", count=len(released))
        return write_json(request, {"success": True, "released": released})

    # ------------------------------------------------------------ ports

    @_route(app, "/ports", params=("fields", "range"))
    def list_ports(self, request: IRequest) -> bytes:
        fields, window = self._parameters(request, views.PORT_FIELDS)
        items = [
            views.port_view(self.factories[port], self.registry.peek(port))
            for port in sorted(self.factories)
        ]
        return write_json(request, views.collection(items, fields, window))

    @_route(app, "/ports/<int:port>")
    def get_port(self, request: IRequest, port: int) -> bytes:
        factory = self._factory(port)
        return write_json(request, views.port_view(factory, self.registry.peek(port)))

    @_route(app, "/ports/<int:port>/session/new", methods=("POST",))
    def port_new(self, request: IRequest, port: int) -> bytes:
        """
        A new session now; an optional JSON object body gives its parameters
        (``{"country": "de"}``).
        """
        factory = self._factory(port)
        raw = request.content.read() if request.content is not None else b""
        try:
            params = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise APIError(400, "bad request", "the body is not JSON") from None
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            raise APIError(400, "bad request", 'expected {"name": "value", ...}')
        try:
            session = self.registry.renew(port, params)
        except InvalidParameter as e:
            raise APIError(400, "bad parameter", str(e)) from None
        return write_json(request, views.session_view(session, factory, self.now))

    @_route(app, "/ports/<int:port>/session/reset", methods=("POST",))
    def port_reset(self, request: IRequest, port: int) -> bytes:
        self._factory(port)
        ended = self.registry.reset(port)
        return write_json(
            request, {"success": True, "ended_session_id": ended.id if ended else None}
        )

    # ------------------------------------------------------------ operations

    @_route(app, "/metrics")
    def metrics_page(self, request: IRequest) -> bytes:
        if self.metrics is None:
            raise APIError(404, "not found", "metrics are not enabled")
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.metrics.registry)

    @_route(app, "/health", open_if="health_open")
    def health_page(self, request: IRequest) -> bytes:
        ok, details = self.health() if self.health is not None else (True, {})
        return write_json(
            request, {"status": "ok" if ok else "down", **details}, 200 if ok else 503
        )

    # ------------------------------------------------------------ the document

    @_route(app, "/openapi.json")
    def openapi(self, request: IRequest) -> bytes:
        mappings = sorted({f.mapping.name for f in self.factories.values()})
        params = sorted({n for f in self.factories.values() for n, _ in f.mapping.session_params})
        document = openapi_document(bool(self.users), mappings, params, self.health_open)
        return write_json(request, document)
