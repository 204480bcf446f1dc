"""
Credential templates: how a session is spelled into the upstream username and
password.

A template such as ``{user}-session-{session}`` is parsed once at load into
literal and field parts; rendering is a join, done once per session (never per
request).  Placeholders are ``{user}``, ``{pass}``, ``{session}`` and
``{port}``; ``{{`` and ``}}`` are literal braces.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping

import attrs

KNOWN_FIELDS = frozenset({"user", "pass", "session", "port"})

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class TemplateError(ValueError):
    """
    A template that cannot be parsed or names an unknown placeholder.
    """


@attrs.frozen
class Template:
    """
    A parsed credential template.
    """

    source: str
    _parts: tuple[tuple[bool, str], ...] = attrs.field(alias="parts")

    @classmethod
    def parse(cls, source: str, known: frozenset[str] = KNOWN_FIELDS) -> Template:
        parts: list[tuple[bool, str]] = []
        pos = 0
        for match in _TOKEN.finditer(source):
            if match.start() > pos:
                parts.append((False, source[pos : match.start()]))
            token = match.group(0)
            if token in ("{{", "}}"):
                parts.append((False, token[0]))
            elif match.group(1) is None:
                raise TemplateError(f"unmatched {token!r} at position {match.start()}")
            else:
                name = match.group(1).strip()
                if name not in known:
                    raise TemplateError(
                        f"unknown placeholder {{{name}}} (known: "
                        + ", ".join("{" + k + "}" for k in sorted(known))
                        + ")"
                    )
                parts.append((True, name))
            pos = match.end()
        if pos < len(source):
            parts.append((False, source[pos:]))
        return cls(source, tuple(parts))

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(value for is_field, value in self._parts if is_field)

    def render(self, values: Mapping[str, str]) -> str:
        return "".join(values[value] if is_field else value for is_field, value in self._parts)


def basic_authorization(username: str, password: str) -> bytes:
    """
    The value of a ``Basic`` (Proxy-)Authorization header.
    """
    token = base64.b64encode(f"{username}:{password}".encode())
    return b"Basic " + token


def parse_basic_authorization(value: bytes) -> tuple[str, str] | None:
    """
    Decode a ``Basic`` credentials header value, or ``None`` if it is not one.
    """
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    if not sep:
        return None
    return username, password
