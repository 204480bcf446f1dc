"""
The OpenAPI 3 document of the admin API, served at ``/openapi.json``.

Kept beside the routes and checked against the live API by schemathesis in
the test suite, so the document cannot drift from the behaviour.
"""

from __future__ import annotations

from typing import Any

from proxymap.admin.site import MAX_BODY, MAX_CLIENTS
from proxymap.admin.views import CONNECTION_FIELDS, PORT_FIELDS, SESSION_FIELDS


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _fields(names: tuple[str, ...]) -> dict[str, Any]:
    alternatives = "|".join(names)
    return {
        "name": "fields",
        "in": "query",
        "required": False,
        "description": "Comma-separated fields to return (the identity is always kept).",
        "schema": {"type": "string", "pattern": f"^({alternatives})(,({alternatives}))*$"},
    }


RANGE = {
    "name": "range",
    "in": "query",
    "required": False,
    "description": "Inclusive slice N-M of the collection, counted from 0.",
    "schema": {"type": "string", "pattern": "^[0-9]{1,9}-[0-9]{1,9}$"},
}
SESSION_ID = {
    "name": "session_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[^/]+$"},
}
PORT = {
    "name": "port",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 0, "maximum": 65535},
}

ERROR = _ref("Error")


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Invalid parameter or body",
        401: "Missing or wrong credentials",
        404: "No such resource",
        413: f"A request body over {MAX_BODY} bytes, refused unread",
        503: f"Over {MAX_CLIENTS} connections at once (see Retry-After)",
    }
    return {str(code): _json(ERROR, text[code]) for code in codes}


def openapi_document(
    secured: bool,
    mappings: list[str] | None = None,
    session_params: list[str] | None = None,
    health_open: bool = False,
) -> dict[str, Any]:
    """
    The document; ``secured`` when admin users are configured (HTTP Basic);
    ``mappings``, the configured mapping names, make the release path exact.
    """
    auth = (401,) if secured else ()

    def op(summary: str, responses: dict[str, Any], *errors: int, **more: Any) -> dict[str, Any]:
        # Any operation may meet the server's bounds (proxymap/admin/site.py);
        # an operation's own answer for a code (the health's 503) comes first.
        codes = _errors(*errors, *auth, 413, 503)
        responses = {**responses, **{c: r for c, r in codes.items() if c not in responses}}
        return {"summary": summary, "responses": responses, **more}

    session = _ref("Session")
    document: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "proxymap admin API", "version": "1"},
        "paths": {
            "/sessions": {
                "get": op(
                    "List live and closing sessions",
                    {"200": _json({"type": "array", "items": session}, "Sessions")},
                    400,
                    parameters=[
                        _fields(SESSION_FIELDS),
                        RANGE,
                        {
                            "name": "port",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 65535},
                        },
                        {
                            "name": "state",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": ["active", "idle"]},
                        },
                    ],
                )
            },
            "/sessions/{session_id}": {
                "get": op(
                    "One session",
                    {"200": _json(session, "The session")},
                    400,
                    404,
                    parameters=[SESSION_ID, _fields(SESSION_FIELDS)],
                ),
                "delete": op(
                    "Close a session and all its connections (after ttl seconds of grace)",
                    {"204": {"description": "Closed"}},
                    400,
                    404,
                    parameters=[
                        SESSION_ID,
                        {
                            "name": "ttl",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "number", "minimum": 0, "maximum": 86400},
                        },
                    ],
                ),
            },
            "/sessions/{session_id}/connections": {
                "get": op(
                    "The client connections using a session",
                    {"200": _json({"type": "array", "items": _ref("Connection")}, "Connections")},
                    400,
                    404,
                    parameters=[SESSION_ID, _fields(CONNECTION_FIELDS), RANGE],
                )
            },
            "/sessions/release": {
                "put": op(
                    "Release sessions by local port, port and session id, or all",
                    {"200": _json(_ref("ReleaseResult"), "What was released")},
                    400,
                    requestBody={
                        "required": True,
                        "content": {"application/json": {"schema": _ref("ReleaseRequest")}},
                    },
                )
            },
            "/sessions/release/{mapping}": {
                "put": op(
                    "Release sessions of one mapping",
                    {"200": _json(_ref("ReleaseResult"), "What was released")},
                    400,
                    404,
                    parameters=[
                        {
                            "name": "mapping",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^[^/]+$"},
                        }
                    ],
                    requestBody={
                        "required": True,
                        "content": {"application/json": {"schema": _ref("ReleaseRequest")}},
                    },
                )
            },
            "/ports": {
                "get": op(
                    "Mapped ports",
                    {"200": _json({"type": "array", "items": _ref("Port")}, "Ports")},
                    400,
                    parameters=[_fields(PORT_FIELDS), RANGE],
                )
            },
            "/ports/{port}": {
                "get": op(
                    "One mapped port",
                    {"200": _json(_ref("Port"), "The port")},
                    404,
                    parameters=[PORT],
                )
            },
            "/ports/{port}/session/new": {
                "post": op(
                    "Replace the port's session now",
                    {"200": _json(session, "The new session")},
                    400,
                    404,
                    parameters=[PORT],
                    requestBody={
                        "required": False,
                        "description": "The new session's parameters (declared by the mapping).",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        name: {"type": "string", "pattern": "^[A-Za-z0-9_.]{0,64}$"}
                                        for name in session_params or []
                                    },
                                }
                            }
                        },
                    },
                )
            },
            "/ports/{port}/session/reset": {
                "post": op(
                    "End the port's session; the next request makes a new one",
                    {"200": _json(_ref("ResetResult"), "Done")},
                    404,
                    parameters=[PORT],
                )
            },
            "/metrics": {
                "get": op(
                    "Prometheus metrics",
                    {
                        "200": {
                            "description": "The exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                )
            },
            "/health": {
                "get": {
                    **op(
                        "Whether every port and the admin API listen",
                        {
                            "200": _json(_ref("Health"), "Up"),
                            "503": _json(_ref("Health"), "Something does not listen"),
                        },
                    ),
                    **({"security": []} if health_open else {}),
                }
            },
            "/openapi.json": {
                "get": op(
                    "This document",
                    {"200": _json({"type": "object"}, "OpenAPI 3 document")},
                )
            },
        },
        "components": {"schemas": SCHEMAS},
    }
    if secured:
        document["components"]["securitySchemes"] = {"basic": {"type": "http", "scheme": "basic"}}
        document["security"] = [{"basic": []}]
    return document


_STATISTICS = {
    "type": "object",
    "additionalProperties": {"type": "integer", "minimum": 0},
}
_DATE = {"type": "string", "description": "RFC 1123 date, GMT"}

SCHEMAS: dict[str, Any] = {
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok", "down"]}},
    },
    "Error": {
        "type": "object",
        "required": ["error", "description"],
        "properties": {
            "error": {"type": "string"},
            "description": {"type": "string"},
            "success": {"type": "boolean", "enum": [False]},
        },
    },
    "Session": {
        "type": "object",
        "required": ["id"],
        "properties": {
            "id": {"type": "string"},
            "port": {"type": "integer"},
            "mapping": {"type": "string"},
            "state": {"type": "string", "enum": ["active", "idle"]},
            "upstream": {"type": "string"},
            "user": {"type": "string"},
            "params": {"type": "object", "additionalProperties": {"type": "string"}},
            "created": _DATE,
            "expires": _DATE,
            "idle": {"type": "number", "minimum": 0},
            "connections": {"type": "integer", "minimum": 0},
            "statistics": _STATISTICS,
        },
    },
    "Connection": {
        "type": "object",
        "required": ["id"],
        "properties": {
            "id": {"type": "integer"},
            "state": {
                "type": "string",
                "enum": ["idle", "request", "connecting", "tunnel", "closed"],
            },
            "client": {"type": "string"},
            "target": {"type": "string", "nullable": True},
            "upstream": {"type": "string", "nullable": True},
            "connected": _DATE,
            "idle": {"type": "number", "minimum": 0},
            "statistics": _STATISTICS,
        },
    },
    "Port": {
        "type": "object",
        "required": ["port"],
        "properties": {
            "port": {"type": "integer"},
            "bind": {
                "type": "string",
                "description": "The address the port listens on: its mapping's, unless "
                "a reload could not move the port there.",
            },
            "mapping": {"type": "string"},
            "upstream": {"type": "string"},
            "session": {"type": "string", "nullable": True},
            "connections": {"type": "integer", "minimum": 0},
        },
    },
    "ReleaseRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "data": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["port"],
                    "properties": {
                        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "sessionId": {"type": "string"},
                    },
                },
            },
            "releaseAll": {"type": "boolean"},
        },
    },
    "ReleaseResult": {
        "type": "object",
        "required": ["success", "released"],
        "properties": {
            "success": {"type": "boolean", "enum": [True]},
            "released": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["port", "sessionId"],
                    "properties": {"port": {"type": "integer"}, "sessionId": {"type": "string"}},
                },
            },
        },
    },
    "ResetResult": {
        "type": "object",
        "required": ["success", "ended_session_id"],
        "properties": {
            "success": {"type": "boolean", "enum": [True]},
            "ended_session_id": {"type": "string", "nullable": True},
        },
    },
}
