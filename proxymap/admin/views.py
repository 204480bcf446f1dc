"""
What the admin API shows: the JSON objects of sessions, connections and
ports, and the ``fields`` / ``range`` / filter request parameters.

Everything here is a pure function of the registry's objects and the time,
so it is tested without any HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from proxymap.dataplane.port import PortFactory
from proxymap.dataplane.server import ProxyServer
from proxymap.sessionapi import http_date
from proxymap.sessions import Session

SESSION_FIELDS = (
    "id",
    "port",
    "mapping",
    "state",
    "upstream",
    "user",
    "params",
    "created",
    "expires",
    "idle",
    "connections",
    "statistics",
)
CONNECTION_FIELDS = (
    "id",
    "state",
    "client",
    "target",
    "upstream",
    "connected",
    "idle",
    "statistics",
)
#: ``active``: client connections are using the session; ``idle``: none are.
SESSION_STATES = ("active", "idle")
PORT_FIELDS = ("port", "bind", "mapping", "upstream", "session", "connections")


class BadParameter(ValueError):
    """
    A request parameter with an invalid value.
    """

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


def session_idle(session: Session, now: float) -> float:
    last = max([session.last_activity, *(c.last_activity for c in session.connections)])
    return round(max(0.0, now - last), 3)


def session_view(session: Session, factory: PortFactory, now: float) -> dict[str, Any]:
    """
    A session as the admin API shows it; never its password.
    """
    state = SESSION_STATES[0] if session.connections else SESSION_STATES[1]
    return {
        "id": session.id,
        "port": session.port,
        "mapping": session.mapping,
        "state": state,
        "upstream": factory.mapping.upstream.address,
        "user": session.username,
        "params": {name: value for name, value in session.params.items() if value},
        "created": http_date(session.created),
        "expires": http_date(session.expires),
        "idle": session_idle(session, now),
        "connections": len(session.connections),
        "statistics": {
            "requests": session.requests,
            "connections_total": session.connections_total,
            "bytes_to_upstream": session.bytes_up,
            "bytes_from_upstream": session.bytes_down,
        },
    }


def connection_view(conn: ProxyServer, now: float) -> dict[str, Any]:
    """
    A client connection and its upstream leg.
    """
    up = conn.upstream
    return {
        "id": conn.id,
        "state": conn.state,
        "client": conn.client,
        "target": conn.target or None,
        "upstream": up.address if up is not None else None,
        "connected": http_date(conn.connected_at),
        "idle": round(max(0.0, now - conn.last_activity), 3),
        "statistics": {
            "reads": conn.reads,
            "writes": conn.writes,
            "bytes_in": conn.bytes_up,
            "bytes_out": conn.bytes_down,
            "requests": conn.requests,
        },
    }


def port_view(factory: PortFactory, session: Session | None) -> dict[str, Any]:
    mapping = factory.mapping
    return {
        "port": factory.port,
        "bind": factory.bind,
        "mapping": mapping.name,
        "upstream": mapping.upstream.address,
        "session": session.id if session is not None else None,
        "connections": len(factory.connections),
    }


def parse_fields(value: str | None, known: Iterable[str]) -> list[str] | None:
    """
    ``fields=a,b``: the fields to keep (``id`` is always kept), or ``None`` for all.
    """
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    known = list(known)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise BadParameter(
            "fields", f"unknown field {unknown[0]!r}" if unknown else "no field named"
        )
    return names


def select(item: Mapping[str, Any], fields: list[str] | None) -> dict[str, Any]:
    """
    Keep only ``fields`` of ``item``, and always its identity (``id``, or a port's ``port``).
    """
    if fields is None:
        return dict(item)
    key = "id" if "id" in item else "port"
    return {name: item[name] for name in item if name in fields or name == key}


def parse_range(value: str | None) -> tuple[int, int] | None:
    """
    ``range=N-M``: an inclusive slice of a collection, counted from 0 (empty
    when M < N).
    """
    if value is None:
        return None
    first, sep, last = value.partition("-")
    if (
        not sep
        or not first.isascii()
        or not first.isdigit()
        or not last.isascii()
        or not last.isdigit()
    ):
        raise BadParameter("range", "expected N-M, e.g. range=0-49")
    return int(first), int(last)


def collection(
    items: list[dict[str, Any]], fields: list[str] | None, window: tuple[int, int] | None
) -> list[dict[str, Any]]:
    if window is not None:
        items = items[window[0] : window[1] + 1]
    return [select(item, fields) for item in items]
