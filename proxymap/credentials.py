"""
Credential templates: how a session is spelled into the upstream username and
password.

A template is parsed once at load and rendered once per session (never per
request).  Its language:

``{name}``
    A placeholder: ``{user}``, ``{pass}``, ``{session}``, ``{port}`` (local),
    ``{lifetime_s}``, ``{lifetime_m}``, and any parameter the mapping declares
    (``{country}``, ``{zone}``, ...).
``{name|lower}``, ``{name|upper}``, ``{name|default:any}``
    Filters, applied left to right.
``[ ... ]``
    An optional part: it disappears when any placeholder inside it renders
    empty.  ``{user}[-country-{country}]-session-{session}`` gives
    ``alice-session-X`` without a country and ``alice-country-us-session-X``
    with one.
``{{``, ``}}``, ``[[``, ``]]``
    Literal braces and brackets.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Union

import attrs

#: Placeholders every template may use.
KNOWN_FIELDS = frozenset({"user", "pass", "session", "port", "lifetime_s", "lifetime_m"})
FILTERS = ("lower", "upper", "default")

_TOKEN = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{([^{}]*)\}|[{}\[\]]")


class TemplateError(ValueError):
    """
    A template that cannot be parsed or names an unknown placeholder.
    """


@attrs.frozen
class Field:
    """
    A placeholder and its filters.
    """

    name: str
    filters: tuple[tuple[str, str], ...] = ()

    def render(self, values: Mapping[str, str]) -> str:
        value = values.get(self.name, "")
        for name, argument in self.filters:
            if name == "lower":
                value = value.lower()
            elif name == "upper":
                value = value.upper()
            elif not value:  # default
                value = argument
        return value


# Union rather than ``|``: an alias is evaluated at import, and PyPy 3.9 has no ``|``
# between classes.
Part = Union[str, Field, tuple[Union[str, Field], ...]]


@attrs.frozen
class Template:
    """
    A parsed credential template.
    """

    source: str
    #: Literal strings, fields, and optional groups (tuples of the two).
    parts: tuple[Part, ...]

    @classmethod
    def parse(cls, source: str, known: frozenset[str] = KNOWN_FIELDS) -> Template:
        parts: list[Part] = []
        group: list[str | Field] | None = None
        pos = 0

        def add(part: str | Field) -> None:
            target = group if group is not None else parts
            if isinstance(part, str) and target and isinstance(target[-1], str):
                target[-1] += part
            else:
                target.append(part)

        for match in _TOKEN.finditer(source):
            if match.start() > pos:
                add(source[pos : match.start()])
            lexeme = match.group(0)
            pos = match.end()
            if lexeme in ("{{", "}}", "[[", "]]"):
                add(lexeme[0])
            elif lexeme == "[":
                if group is not None:
                    raise TemplateError(f"optional parts cannot nest (position {match.start()})")
                group = []
            elif lexeme == "]":
                if group is None:
                    raise TemplateError(f"unmatched ']' at position {match.start()}")
                if not any(isinstance(p, Field) for p in group):
                    raise TemplateError("an optional part [...] needs a placeholder inside")
                parts.append(tuple(group))
                group = None
            elif match.group(1) is None:
                raise TemplateError(f"unmatched {lexeme!r} at position {match.start()}")
            else:
                add(_field(match.group(1), known))
        if pos < len(source):
            add(source[pos:])
        if group is not None:
            raise TemplateError("unmatched '['")
        return cls(source, tuple(parts))

    @property
    def fields(self) -> frozenset[str]:
        """
        Every placeholder the template uses.
        """
        names = set()
        for part in self.parts:
            for item in part if isinstance(part, tuple) else (part,):
                if isinstance(item, Field):
                    names.add(item.name)
        return frozenset(names)

    @property
    def required_fields(self) -> frozenset[str]:
        """
        Placeholders outside optional parts (and without a default): they must
        not render empty.
        """
        return frozenset(
            part.name
            for part in self.parts
            if isinstance(part, Field) and not any(f == "default" for f, _ in part.filters)
        )

    def render(self, values: Mapping[str, str]) -> str:
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, Field):
                out.append(part.render(values))
            else:
                pieces = [p if isinstance(p, str) else p.render(values) for p in part]
                fields = [pieces[i] for i, p in enumerate(part) if isinstance(p, Field)]
                if all(fields):
                    out.extend(pieces)
        return "".join(out)


def _field(text: str, known: frozenset[str]) -> Field:
    name, *filter_texts = (piece.strip() for piece in text.split("|"))
    if name not in known:
        raise TemplateError(
            f"unknown placeholder {{{name}}} (known: "
            + ", ".join("{" + k + "}" for k in sorted(known))
            + ")"
        )
    filters = []
    for filter_text in filter_texts:
        filter_name, _, argument = filter_text.partition(":")
        if filter_name not in FILTERS:
            raise TemplateError(
                f"unknown filter |{filter_name} in {{{text}}} (known: lower, upper, default:VALUE)"
            )
        if (filter_name == "default") != bool(argument):
            raise TemplateError(f"|{filter_text}: only default takes a value (default:VALUE)")
        filters.append((filter_name, argument))
    return Field(name, tuple(filters))


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
