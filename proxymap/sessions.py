"""
The session registry: the current sticky session of every mapped port.

A port has at most one current session.  It is created lazily, by the first
proxied request (or Session API call) that finds none, and expires a fixed
lifetime after creation; expiry is a ``callLater`` on the injected clock, and
the delayed call is cancelled whenever the session ends early.  After a
session ends the port has none until something asks again.

Other parts of proxymap (the admin API, vendor release, metrics) watch sessions
start and end through :meth:`SessionRegistry.subscribe`.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable, Mapping
from typing import Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from proxymap.config import MappingConfig, SessionIdSpec, param_value_problem
from proxymap.credentials import basic_authorization

log = Logger()

#: How many fresh ids we draw before deciding the id space is exhausted.
MAX_ID_ATTEMPTS = 100


class EndReason(enum.Enum):
    """
    Why a session ended.
    """

    EXPIRED = "expired"
    RESET = "reset"
    RENEWED = "renewed"
    CLOSED = "closed"
    RELEASED = "released"
    #: proxymap stopped with nothing to save the session (no state file):
    #: the next process starts afresh, so this one will not be used again.
    STOPPED = "stopped"


class SessionConnection(Protocol):
    """
    What the registry (and its readers) need of a client connection using a session.
    """

    id: int
    last_activity: float

    @property
    def state(self) -> str:
        """
        ``idle``, ``request``, ``connecting`` (a CONNECT), ``tunnel`` or ``closed``.
        """

    def abort(self) -> None:
        """
        Close the client connection and its upstream connection now.
        """


class SessionObserver(Protocol):
    """
    Something told when sessions start and end.
    """

    def session_started(self, session: Session) -> None: ...

    def session_ended(self, session: Session, reason: EndReason) -> None: ...


class NoSuchPort(KeyError):
    """
    The port is not mapped.
    """


class IdSpaceExhausted(RuntimeError):
    """
    No unused session id could be drawn.
    """


class InvalidParameter(ValueError):
    """
    A session parameter the mapping does not declare, or an invalid value.
    """

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


def secure_id(spec: SessionIdSpec) -> str:
    """
    A session id drawn with :mod:`secrets` from the spec's alphabet.
    """
    if spec.number_range is not None:
        low, high = spec.number_range
        return str(low + secrets.randbelow(high - low + 1))
    alphabet = spec.alphabet
    return "".join(secrets.choice(alphabet) for _ in range(spec.length))


def spelled_as(spec: SessionIdSpec, session_id: str) -> bool:
    """
    Whether :func:`secure_id` could have drawn ``session_id`` under ``spec``.
    """
    if spec.number_range is not None:
        low, high = spec.number_range
        return (
            session_id.isascii()
            and session_id.isdigit()
            and len(session_id) <= len(str(high))
            and str(int(session_id)) == session_id
            and low <= int(session_id) <= high
        )
    return len(session_id) == spec.length and all(c in spec.alphabet for c in session_id)


@attrs.frozen
class PortPolicy:
    """
    Everything the registry needs to know to make a port's sessions: which
    mapping it belongs to, the lifetime, how ids look and how they are spelled
    into upstream credentials.
    """

    mapping: MappingConfig

    def session_params(self, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        """
        A session's parameters: the mapping's defaults with ``overrides``.

        :raises InvalidParameter: for an undeclared name or an invalid value.
        """
        params = dict(self.mapping.session_params)
        for name, value in (overrides or {}).items():
            if name not in params:
                declared = ", ".join(sorted(params)) or "none"
                raise InvalidParameter(name, f"not a session parameter here (declared: {declared})")
            problem = param_value_problem(value)
            if problem:
                raise InvalidParameter(name, problem)
            params[name] = value
        return params

    def credentials(self, session_id: str, port: int, params: Mapping[str, str]) -> tuple[str, str]:
        mapping = self.mapping
        values = mapping.template_values(session_id, port, params)
        return mapping.username.render(values), mapping.password_template.render(values)


@attrs.define(eq=False)
class Session:
    """
    One sticky session: an id, rendered into upstream credentials, owned by a port.

    Counters are plain attributes that the data plane increments; they count
    what passed while this was the session in use.
    """

    id: str
    port: int
    mapping: str
    created: float
    expires: float
    username: str
    #: The ``Proxy-Authorization`` value sent upstream (holds the password).
    authorization: bytes = attrs.field(repr=False)
    #: The rendered upstream password (for SOCKS5 upstreams).
    password: str = attrs.field(repr=False)
    last_activity: float
    #: The session's parameters (``country``, ...); "" means absent.
    params: dict[str, str] = attrs.field(factory=dict)
    requests: int = 0
    connections_total: int = 0
    #: Bytes sent upstream (request heads as sent, bodies, tunnel bytes) and
    #: received from it (response heads, bodies, tunnel bytes).
    bytes_up: int = 0
    bytes_down: int = 0
    ended: EndReason | None = None
    ended_at: float | None = None
    connections: set[SessionConnection] = attrs.field(factory=set, repr=False)
    _expiry: IDelayedCall | None = attrs.field(default=None, repr=False, alias="expiry")

    @property
    def live(self) -> bool:
        return self.ended is None

    @property
    def lifetime(self) -> float:
        return self.expires - self.created


@attrs.define(eq=False)
class SessionRegistry(Service):
    """
    The current session of each port, with expiry on ``clock``.
    """

    clock: IReactorTime
    new_id: Callable[[SessionIdSpec], str] = secure_id
    _policies: dict[int, PortPolicy] = attrs.field(factory=dict, init=False)
    _current: dict[int, Session] = attrs.field(factory=dict, init=False)
    _by_id: dict[str, Session] = attrs.field(factory=dict, init=False)
    _observers: list[SessionObserver] = attrs.field(factory=list, init=False)

    # Service's own attributes, which attrs would otherwise not know about.
    name: str | None = attrs.field(default="sessions", init=False)
    parent: object = attrs.field(default=None, init=False)
    running: int = attrs.field(default=0, init=False)

    def add_port(self, port: int, policy: PortPolicy) -> None:
        """
        Map ``port``: from now on it has sessions made by ``policy``.
        """
        self._policies[port] = policy

    def remove_port(self, port: int) -> None:
        """
        Unmap ``port``; its session (if any) must have ended first.
        """
        if port in self._current:
            raise ValueError(f"port {port} still has a live session")
        self._policies.pop(port, None)

    def ports(self) -> list[int]:
        return list(self._policies)

    def policy(self, port: int) -> PortPolicy:
        try:
            return self._policies[port]
        except KeyError:
            raise NoSuchPort(port) from None

    def subscribe(self, observer: SessionObserver) -> Callable[[], None]:
        """
        Tell ``observer`` about every session start and end; returns a
        callable that stops that.
        """
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    # ------------------------------------------------------------ queries

    def current(self, port: int) -> Session:
        """
        The port's current session, created now if it has none.
        """
        session = self._current.get(port)
        if session is None:
            session = self._create(port)
        return session

    def peek(self, port: int) -> Session | None:
        """
        The port's current session, or ``None``; never creates one.
        """
        self.policy(port)
        return self._current.get(port)

    def get(self, session_id: str) -> Session | None:
        """
        The live session with this id, if any.
        """
        return self._by_id.get(session_id)

    def list(self) -> list[Session]:
        """
        Every live session, in port order.
        """
        return [self._current[port] for port in sorted(self._current)]

    # ------------------------------------------------------------ changes

    def end(self, session_id: str, reason: EndReason) -> Session | None:
        """
        End the live session ``session_id``; returns it, or ``None`` if no
        such session is live.  Connections using it are not closed here:
        closing them is the caller's choice (see :meth:`close`).
        """
        session = self._by_id.pop(session_id, None)
        if session is None:
            return None
        del self._current[session.port]
        if session._expiry is not None and session._expiry.active():
            session._expiry.cancel()
        session._expiry = None
        session.ended = reason
        session.ended_at = self.clock.seconds()
        log.info(
            "session {session_id} of port {port} ended: {reason}",
            session_id=session.id,
            port=session.port,
            reason=reason.value,
        )
        for observer in list(self._observers):
            try:
                observer.session_ended(session, reason)
            except Exception:
                log.failure("session observer {observer!r} failed", observer=observer)
        return session

    def close(self, session_id: str, reason: EndReason = EndReason.CLOSED) -> Session | None:
        """
        End the session and abort every client connection still using it.
        """
        session = self.end(session_id, reason)
        if session is not None:
            for connection in list(session.connections):
                connection.abort()
        return session

    def close_tunnels(self, session: Session) -> int:
        """
        Abort the client connections tunnelling through ``session``, or
        opening a tunnel through it; returns how many.  A tunnel cannot
        change session: after a worker replaced its session, one left open
        would go on exiting where the worker asked to leave.  Other
        connections stay: their next request takes the port's new session.
        """
        tunnels = [c for c in session.connections if c.state in ("tunnel", "connecting")]
        for connection in tunnels:
            connection.abort()
        return len(tunnels)

    def reset(self, port: int) -> Session | None:
        """
        End the port's current session, if it has one; the next request makes a new one.
        """
        session = self.peek(port)
        if session is None:
            return None
        return self.end(session.id, EndReason.RESET)

    def renew(self, port: int, params: Mapping[str, str] | None = None) -> Session:
        """
        Replace the port's current session by a new one, now, with ``params``
        over the mapping's defaults.

        :raises InvalidParameter: before anything changes.
        """
        chosen = self.policy(port).session_params(params)
        session = self.peek(port)
        if session is not None:
            self.end(session.id, EndReason.RENEWED)
        return self._create(port, chosen)

    def restore(
        self, port: int, session_id: str, created: float, expires: float, params: dict[str, str]
    ) -> Session:
        """
        Bring back a saved session (after a restart) with its own id and times.
        """
        policy = self.policy(port)
        if session_id in self._by_id or port in self._current:
            raise ValueError(f"port {port} or session {session_id} is already live")
        chosen = policy.session_params(params)
        return self._create(port, chosen, session_id=session_id, created=created, expires=expires)

    def _create(
        self,
        port: int,
        params: dict[str, str] | None = None,
        session_id: str | None = None,
        created: float | None = None,
        expires: float | None = None,
    ) -> Session:
        policy = self.policy(port)
        mapping = policy.mapping
        if params is None:
            params = policy.session_params()
        if session_id is None:
            for _ in range(MAX_ID_ATTEMPTS):
                session_id = self.new_id(mapping.session_id)
                if session_id not in self._by_id:
                    break
            else:
                raise IdSpaceExhausted(f"no unused session id after {MAX_ID_ATTEMPTS} draws")
        username, password = policy.credentials(session_id, port, params)
        now = self.clock.seconds()
        session = Session(
            id=session_id,
            port=port,
            mapping=mapping.name,
            created=now if created is None else created,
            expires=now + mapping.lifetime if expires is None else expires,
            username=username,
            authorization=basic_authorization(username, password),
            password=password,
            last_activity=now,
            params=params,
        )
        self._schedule(session)
        self._current[port] = session
        self._by_id[session_id] = session
        log.info(
            "session {session_id} started on port {port} ({mapping})",
            session_id=session_id,
            port=port,
            mapping=mapping.name,
        )
        for observer in list(self._observers):
            try:
                observer.session_started(session)
            except Exception:
                log.failure("session observer {observer!r} failed", observer=observer)
        return session

    def _schedule(self, session: Session) -> None:
        delay = max(0.0, session.expires - self.clock.seconds())
        session._expiry = self.clock.callLater(delay, self.end, session.id, EndReason.EXPIRED)

    # ------------------------------------------------------------ service

    def startService(self) -> None:
        """
        Re-arm the expiry of sessions that outlived a stop.
        """
        Service.startService(self)
        for session in self._current.values():
            if session._expiry is None:
                self._schedule(session)

    def stopService(self) -> None:
        """
        Cancel every pending expiry; the sessions themselves stay as they are.
        """
        for session in self._current.values():
            if session._expiry is not None and session._expiry.active():
                session._expiry.cancel()
            session._expiry = None
        Service.stopService(self)
