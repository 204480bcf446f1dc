"""
Configuration: the TOML file, validated into frozen values.

Every problem becomes a :class:`ConfigError` naming the key (``mapping[0].ports``)
and the problem in one line; the tap prints that line and exits, so a user
never sees a traceback for a bad file.  Unknown keys are errors: a typo must
not silently fall back to a default.

Secrets (upstream passwords) may be written inline or as ``env:NAME`` /
``file:PATH`` references, and are held in :class:`Secret`, whose ``repr``
never shows the value.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import sys
from collections.abc import Mapping
from collections.abc import Mapping as MappingABC
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # PyPy 3.9 (Debian 12's pypy3): the same parser, from PyPI
    import tomli as tomllib

from proxymap.credentials import KNOWN_FIELDS, Template, TemplateError

if TYPE_CHECKING:
    from proxymap.vendors.release import ReleaseConfig

DEFAULT_LIFETIME = 600.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_ALPHABET = "A-Za-z"
DEFAULT_ID_LENGTH = 8
DEFAULT_ADMIN_LISTEN = "tcp:8700:interface=127.0.0.1"
DEFAULT_SESSION_API_DOMAIN = "portmapper"
#: The longest duration any key takes (365 days): sessions and timeouts
#: longer than a year are mistakes, and a session's expiry must stay a date
#: the Session API can write.
MAX_DURATION = 365 * 86400.0


class ConfigError(Exception):
    """
    A configuration problem, naming the key it is about.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}" if self.key else self.problem


@attrs.frozen(repr=False)
class Secret:
    """
    A secret string whose ``repr`` and ``str`` never reveal it.
    """

    value: str

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def bracketed(host: str) -> str:
    """
    ``host`` as written before ``:port``: an IPv6 address in brackets.
    """
    return f"[{host}]" if ":" in host else host


@attrs.frozen
class Upstream:
    """
    Where a mapping's traffic goes: the vendor's gateway.
    """

    scheme: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{bracketed(self.host)}:{self.port}"


@attrs.frozen
class SessionIdSpec:
    """
    How session ids are spelled: characters drawn from ``alphabet``, ``length``
    long; or, for vendors whose ids are numbers, a number in ``number_range``.
    """

    alphabet: str
    length: int
    number_range: tuple[int, int] | None = None


@attrs.frozen
class SessionAPIConfig:
    """
    The in-band Session API: off by default, reached through ``domain``.
    """

    enabled: bool = False
    domain: str = DEFAULT_SESSION_API_DOMAIN


@attrs.frozen
class MappingConfig:
    """
    One vendor gateway turned into a range of local ports.
    """

    name: str
    ports: tuple[int, ...]
    bind: str
    upstream: Upstream
    user: str
    password: Secret
    username: Template
    password_template: Template
    lifetime: float
    session_id: SessionIdSpec
    connect_timeout: float
    session_api: SessionAPIConfig
    #: The vendor preset this mapping started from, if any.
    preset: str | None = None
    #: Mapping-level template values (``customer``, ``zone``, ...).
    params: tuple[tuple[str, str], ...] = ()
    #: Parameters a session may carry, with their defaults ("" = absent).
    session_params: tuple[tuple[str, str], ...] = ()
    #: How to release sessions at the vendor, if configured.
    release: ReleaseConfig | None = None
    #: What clients may speak on the ports: "http", "socks5", "socks4".
    protocols: frozenset[str] = frozenset({"http", "socks5", "socks4"})
    #: SOCKS5 upstreams: resolve target names here ("local") or at the vendor.
    socks_resolve: str = "remote"
    #: Clients who may use the ports (Basic / SOCKS5 username/password); none: open.
    client_users: tuple[tuple[str, Secret], ...] = ()
    #: https:// upstreams: the certificates (PEM) the gateway's must chain
    #: to; none: the system's authorities.
    upstream_ca: tuple[bytes, ...] = ()

    def template_values(
        self, session_id: str, port: int, params: Mapping[str, str]
    ) -> dict[str, str]:
        """
        Everything a credential template may use, for one session.
        """
        values = {
            "user": self.user,
            "pass": self.password.value,
            "session": session_id,
            "port": str(port),
            "lifetime_s": str(round(self.lifetime)),
            "lifetime_m": str(round(self.lifetime / 60)),
        }
        values.update(self.params)
        values.update(params)
        return values


@attrs.frozen
class Limits:
    """
    What one client may take: sizes, times and connection counts.
    """

    max_head_size: int = 64 * 1024
    max_headers: int = 128
    #: From a request head's first byte to its end (slowloris).
    head_timeout: float = 30.0
    #: A keep-alive connection waiting for its next request.
    idle_timeout: float = 300.0
    #: A tunnel with no bytes either way.
    tunnel_idle_timeout: float = 3600.0
    max_connections_per_port: int = 1000
    max_connections: int = 9000
    #: Idle upstream connections kept for the next client connection of the
    #: same session, across all ports (0: none; see dataplane/pool.py).
    max_idle_upstreams: int = 2048
    #: How long such a connection is kept.
    idle_upstream_timeout: float = 30.0


@attrs.frozen
class ServiceConfig:
    """
    How the daemon stops and what it remembers across restarts.
    """

    #: On SIGTERM, how long open tunnels and requests may go on.
    grace: float = 10.0
    #: Where live sessions are saved ("" = nowhere).
    state_file: str = ""


@attrs.frozen
class AdminConfig:
    """
    Where the admin API listens (``""``: nowhere) and who may use it.
    """

    listen: str = DEFAULT_ADMIN_LISTEN
    users: tuple[tuple[str, Secret], ...] = ()
    #: Leave /health open (no credentials) for load-balancer and systemd probes.
    health_open: bool = False


def _endpoint_parts(description: str) -> tuple[str, list[str], list[tuple[str, str]]]:
    """
    Read a server endpoint description as Twisted does: ``:``-separated
    parts, ``name=value`` ones being parameters, ``\\`` escaping the next
    character.  Returns the kind, the positional parts and the parameters
    in the order written (a name may repeat; Twisted keeps the last).
    """
    parts: list[str] = []
    params: list[tuple[str, str]] = []
    fields: list[str] = []
    current, escaped = "", False

    def finish_part() -> None:
        fields.append(current)
        if len(fields) == 1:
            parts.append(fields[0])
        else:
            params.append((fields[0], fields[1]))
        fields.clear()

    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "=":
            fields.append(current)
            current = ""
        elif char == ":":
            finish_part()
            current = ""
        else:
            current += char
    finish_part()
    kind = parts.pop(0) if parts else ""
    return kind, parts, params


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _limits(table: _Table) -> Limits:
    defaults = Limits()
    values: dict[str, Any] = {}
    for field in ("max_head_size", "max_headers", "max_connections_per_port", "max_connections"):
        value = table.pop_typed(field, int, getattr(defaults, field))
        if value < 1:
            raise ConfigError(table.name(field), "must be at least 1")
        values[field] = value
    if values["max_head_size"] < 1024:
        raise ConfigError(table.name("max_head_size"), "must be at least 1024 bytes")
    idle = table.pop_typed("max_idle_upstreams", int, defaults.max_idle_upstreams)
    if idle < 0:
        raise ConfigError(table.name("max_idle_upstreams"), "must be 0 (none) or more")
    values["max_idle_upstreams"] = idle
    for field in ("head_timeout", "idle_timeout", "tunnel_idle_timeout", "idle_upstream_timeout"):
        values[field] = parse_duration(
            table.pop(field, getattr(defaults, field)), table.name(field)
        )
    table.finish()
    return Limits(**values)


def listen_is_loopback(description: str) -> bool:
    """
    Whether a server endpoint description only accepts local connections:
    a UNIX socket, or TCP bound to a loopback interface.
    """
    kind, parts, params = _endpoint_parts(description)
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6"):
        return False
    # By position or by name, the last one given, as Twisted reads it.
    interface = dict([*zip(_ENDPOINT_PARAMS[kind], parts), *params]).get("interface")
    return interface is not None and _is_loopback(interface)


@attrs.frozen
class Config:
    """
    The whole validated configuration.
    """

    mappings: tuple[MappingConfig, ...]
    session_api: SessionAPIConfig = SessionAPIConfig()
    admin: AdminConfig = AdminConfig()
    limits: Limits = Limits()
    service: ServiceConfig = ServiceConfig()


# ---------------------------------------------------------------- parsing helpers

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object, key: str) -> float:
    """
    Parse ``"10m"``, ``"90s"``, ``"1h30m"``, ``"250ms"`` or a number of seconds.
    """
    if isinstance(value, bool):
        raise ConfigError(key, 'expected a duration such as "10m" or "90s"')
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        pos = 0
        seconds = 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ConfigError(
                key, f"{value!r} is not a duration (use a number with a unit: ms, s, m, h, d)"
            )
    else:
        raise ConfigError(key, 'expected a duration such as "10m" or "90s"')
    if math.isnan(seconds):
        raise ConfigError(key, 'expected a duration such as "10m" or "90s"')
    if seconds <= 0:
        raise ConfigError(key, "must be greater than zero")
    if seconds > MAX_DURATION:
        raise ConfigError(key, "must be at most 365d")
    return seconds


def parse_ports(value: object, key: str) -> tuple[int, ...]:
    """
    Parse ``"10201-10300"``, ``10201`` or a list of ports and ranges.
    """
    items = value if isinstance(value, list) else [value]
    ports: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise ConfigError(key, f"{item!r} is not a port")
        if isinstance(item, int):
            ports.append(_check_port(item, key))
        elif isinstance(item, str):
            first, sep, last = item.partition("-")
            try:
                low = int(first)
                high = int(last) if sep else low
            except ValueError:
                raise ConfigError(
                    key, f'{item!r} is not a port or a range such as "10201-10300"'
                ) from None
            _check_port(low, key)
            _check_port(high, key)
            if high < low:
                raise ConfigError(key, f"range {item!r} ends before it starts")
            ports.extend(range(low, high + 1))
        else:
            raise ConfigError(key, f"{item!r} is not a port or a range")
    if not ports:
        raise ConfigError(key, "no ports given")
    seen: set[int] = set()
    for port in ports:
        if port in seen:
            raise ConfigError(key, f"port {port} is listed twice")
        seen.add(port)
    return tuple(ports)


def _check_port(port: int, key: str) -> int:
    if not 1 <= port <= 65535:
        raise ConfigError(key, f"port {port} is outside 1-65535")
    return port


#: Upstream schemes and their default ports.
_UPSTREAM_PORTS = {"http": 80, "https": 443, "socks5": 1080}

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def parse_bind(value: str, key: str) -> str:
    """
    The address mapped ports listen on: an IP address, or ``localhost``
    read as 127.0.0.1.  Not another name: binding to one would look it up
    with the reactor waiting, at every reload that adds a port.
    """
    if value.strip().lower() == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ConfigError(
            key,
            f"{value!r} is not an IP address (0.0.0.0 listens on every IPv4 interface, "
            ":: on every interface)",
        ) from None


def parse_upstream_ca(value: object, key: str, upstream: Upstream) -> tuple[bytes, ...]:
    """
    Read the certificates (PEM) an ``https://`` upstream's own must chain
    to, instead of the system's authorities.
    """
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "expected the path of a PEM file of certificates")
    if upstream.scheme != "https":
        raise ConfigError(key, "only an https:// upstream is reached over TLS")
    path = Path(value)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror or e}") from None
    blocks = tuple(_PEM_CERTIFICATE.findall(data))
    if not blocks:
        raise ConfigError(key, f"{path} holds no PEM certificate")
    from cryptography import x509

    for block in blocks:
        try:
            x509.load_pem_x509_certificate(block)
        except ValueError:
            raise ConfigError(key, f"{path} holds a certificate that does not parse") from None
    return blocks


def parse_upstream(value: object, key: str) -> Upstream:
    """
    Parse ``http://host:port``, ``https://host:port`` (an HTTP proxy reached
    over TLS) or ``socks5://host:port``.
    """
    if not isinstance(value, str):
        raise ConfigError(key, 'expected a URL such as "http://gw.example.com:10000"')
    match = re.fullmatch(
        r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<userinfo>[^@/]*@)?"
        r"(?P<host>\[[0-9a-fA-F:.]+\]|[^:/\[\]]+)(?::(?P<port>\d+))?/?",
        value.strip(),
    )
    if match is None:
        raise ConfigError(key, f'{value!r} is not a URL such as "http://gw.example.com:10000"')
    scheme = match.group("scheme").lower()
    if scheme not in _UPSTREAM_PORTS:
        raise ConfigError(key, f"unsupported scheme {scheme!r} (supported: http, https, socks5)")
    if match.group("userinfo"):
        raise ConfigError(key, "put upstream credentials in 'user' and 'pass', not in the URL")
    host = match.group("host").strip("[]")
    problem = _host_problem(
        host, bracketed=match.group("host").startswith("["), tls=scheme == "https"
    )
    if problem is not None:
        raise ConfigError(key, f"{host!r} {problem}")
    port = int(match.group("port")) if match.group("port") else _UPSTREAM_PORTS[scheme]
    _check_port(port, key)
    return Upstream(scheme, host, port)


_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _host_problem(host: str, bracketed: bool, tls: bool) -> str | None:
    """
    What is wrong with ``host`` as an upstream's host, or ``None``: it must
    be an IP address or a DNS name (IDNA for other scripts; ``_`` allowed,
    as some private names have it, but not where a certificate must name
    it).  Found here, not at the first request: a name a lookup or a
    certificate check cannot take failed every request of the mapping.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if bracketed:
        return None if isinstance(address, ipaddress.IPv6Address) else "is not an IPv6 address"
    if address is not None:
        return None
    try:
        ascii_name = host.encode("idna").decode("ascii")
    except UnicodeError:
        return "is not a host name (IDNA cannot encode it)"
    labels = ascii_name.removesuffix(".").split(".")
    if len(ascii_name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return "is not a host name (letters, digits, '-' and '_' in dot-separated labels)"
    if labels[-1].isdigit() or labels[-1].lower().startswith("0x"):
        return "is neither a host name nor an IP address written in full"
    if tls:
        from twisted.internet.ssl import optionsForClientTLS

        try:
            optionsForClientTLS(host)
        except Exception as e:  # idna's errors, from the same check a connection makes
            return f"cannot be checked against a certificate: {e}"
    return None


def expand_alphabet(spec: str, key: str) -> str:
    """
    Expand ``"A-Za-z0-9"`` into the characters it names (ranges and single characters).
    """
    chars: list[str] = []
    i = 0
    while i < len(spec):
        if i + 2 < len(spec) and spec[i + 1] == "-":
            low, high = spec[i], spec[i + 2]
            if ord(high) < ord(low):
                raise ConfigError(key, f"range {low}-{high} ends before it starts")
            chars.extend(chr(c) for c in range(ord(low), ord(high) + 1))
            i += 3
        else:
            chars.append(spec[i])
            i += 1
    result = "".join(dict.fromkeys(chars))
    bad = [c for c in result if not (c.isascii() and c.isprintable()) or c in " :@/\\\"'"]
    if bad:
        raise ConfigError(key, f"character {bad[0]!r} cannot be used in a session id")
    if len(result) < 2:
        raise ConfigError(key, "needs at least two distinct characters")
    return result


#: The longest secret file read: a password, a key, never a log.
MAX_SECRET_FILE = 64 * 1024
#: The longest configuration file read: far beyond any real one (10,000
#: mappings take some 2 MB), short of what a device would fill memory with.
MAX_CONFIG_FILE = 16 * 1024 * 1024


def resolve_secret(value: object, key: str, env: MappingABC[str, str]) -> Secret:
    """
    Resolve an inline secret or an ``env:NAME`` / ``file:PATH`` reference.

    A file must be a regular file of UTF-8 text, at most
    :data:`MAX_SECRET_FILE` bytes: a device or a FIFO would be read for
    ever (``/dev/zero``) or block start-up, with nothing said.
    """
    if not isinstance(value, str):
        raise ConfigError(key, 'expected a string, "env:NAME" or "file:PATH"')
    if value.startswith("env:"):
        name = value[4:]
        if not name:
            raise ConfigError(key, 'name the environment variable: "env:NAME"')
        if name not in env:
            raise ConfigError(key, f"environment variable {name} is not set")
        return Secret(env[name])
    if value.startswith("file:"):
        if not value[5:]:
            raise ConfigError(key, 'name the file: "file:PATH"')
        path = Path(value[5:])
        try:
            # Without blocking: opening a FIFO would wait for a writer.
            with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise ConfigError(key, f"{path} is not a regular file")
                data = f.read(MAX_SECRET_FILE + 1)
        except OSError as e:
            raise ConfigError(key, f"cannot read {path}: {e.strerror or e}") from None
        if len(data) > MAX_SECRET_FILE:
            raise ConfigError(key, f"{path} is longer than {MAX_SECRET_FILE} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(key, f"{path} is not UTF-8 text") from None
        return Secret(text.rstrip("\r\n"))
    return Secret(value)


def toml_key(field: str) -> str:
    """
    ``field`` written as a TOML key: bare when it can be, else quoted, with
    whatever would not print escaped, so that a message naming it stays one
    line however the key was spelled in the file.
    """
    if re.fullmatch(r"[A-Za-z0-9_-]+", field):
        return field
    quoted = []
    for c in field:
        if c in '"\\':
            quoted.append("\\" + c)
        elif c.isprintable():
            quoted.append(c)
        else:
            quoted.append(f"\\u{ord(c):04X}" if ord(c) < 0x10000 else f"\\U{ord(c):08X}")
    return '"' + "".join(quoted) + '"'


class _Table:
    """
    A TOML table being read: hands out values with their full key names and
    complains about whatever is left unread.
    """

    def __init__(self, data: object, key: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(key, "expected a table")
        self._data = dict(data)
        self.key = key

    def name(self, field: str) -> str:
        field = toml_key(field)
        return f"{self.key}.{field}" if self.key else field

    def keys(self) -> list[str]:
        return list(self._data)

    def pop(self, field: str, default: Any = None) -> Any:
        return self._data.pop(field, default)

    def pop_typed(self, field: str, kind: type, default: Any) -> Any:
        value = self._data.pop(field, default)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(self.name(field), f"expected {_KIND_NAMES.get(kind, kind.__name__)}")
        return value

    def require(self, field: str) -> Any:
        if field not in self._data:
            raise ConfigError(self.name(field), "is required")
        return self._data.pop(field)

    def finish(self) -> None:
        for field in self._data:
            raise ConfigError(self.name(field), "unknown key")


_KIND_NAMES = {str: "a string", bool: "true or false", int: "a whole number", dict: "a table"}


# ---------------------------------------------------------------- the file


_PARAM_VALUE = re.compile(r"[A-Za-z0-9_.]{0,64}")


def param_value_problem(value: str) -> str | None:
    """
    Why ``value`` cannot be a session parameter value, or ``None``.
    """
    if _PARAM_VALUE.fullmatch(value):
        return None
    return "use at most 64 letters, digits, '_' and '.'"


def _span(seconds: float) -> str:
    if seconds % 86400 == 0:
        return f"{seconds / 86400:g}d"
    if seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def _string_table(table: _Table, field: str, defaults: dict[str, str]) -> dict[str, str]:
    raw = _Table(table.pop(field, {}), table.name(field))
    values = dict(defaults)
    for name in raw.keys():
        value = raw.pop(name)
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
            raise ConfigError(raw.name(name), "names are lowercase letters, digits and _")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ConfigError(raw.name(name), "expected a string")
        values[name] = str(value)
    return values


def _session_api(table: _Table, default: SessionAPIConfig) -> SessionAPIConfig:
    enabled = table.pop_typed("enabled", bool, default.enabled)
    domain = table.pop_typed("domain", str, default.domain).strip().lower()
    if len(domain) > 1 and domain.endswith("."):
        domain = domain[:-1]  # fully qualified: the same name
    if domain and not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", domain):
        raise ConfigError(table.name("domain"), f"{domain!r} is not a host name")
    table.finish()
    return SessionAPIConfig(enabled=enabled, domain=domain)


def _mapping(
    table: _Table, index: int, api_default: SessionAPIConfig, env: MappingABC[str, str]
) -> MappingConfig:
    name = table.pop_typed("name", str, f"mapping-{index}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name):
        raise ConfigError(
            table.name("name"), "use letters, digits, '.', '_' and '-' (at most 63 characters)"
        )
    ports = parse_ports(table.require("ports"), table.name("ports"))
    bind = parse_bind(table.pop_typed("bind", str, "127.0.0.1"), table.name("bind"))
    upstream = parse_upstream(table.require("upstream"), table.name("upstream"))
    user = table.pop_typed("user", str, "")
    password = resolve_secret(table.pop("pass", ""), table.name("pass"), env)
    lifetime = parse_duration(table.pop("lifetime", DEFAULT_LIFETIME), table.name("lifetime"))
    connect_timeout = parse_duration(
        table.pop("connect_timeout", DEFAULT_CONNECT_TIMEOUT), table.name("connect_timeout")
    )

    preset_name = table.pop_typed("preset", str, "")
    preset = None
    if preset_name:
        from proxymap.vendors.presets import PRESETS

        preset = PRESETS.get(preset_name)
        if preset is None:
            raise ConfigError(
                table.name("preset"),
                f"unknown preset {preset_name!r} (known: {', '.join(sorted(PRESETS))})",
            )

    params = _string_table(table, "params", dict(preset.params) if preset else {})
    session_params = _string_table(
        table, "session_params", dict(preset.session_params) if preset else {}
    )
    for key, value in session_params.items():
        problem = param_value_problem(value)
        if problem:
            raise ConfigError(f"{table.name('session_params')}.{key}", problem)
    clash = (set(params) | set(session_params)) & KNOWN_FIELDS
    if clash or set(params) & set(session_params):
        taken = sorted(clash or set(params) & set(session_params))[0]
        raise ConfigError(table.name("params"), f"{taken!r} is taken; choose another name")

    id_table = _Table(table.pop("session_id", {}), table.name("session_id"))
    alphabet = expand_alphabet(
        id_table.pop_typed("alphabet", str, preset.alphabet if preset else DEFAULT_ALPHABET),
        id_table.name("alphabet"),
    )
    length = id_table.pop_typed("length", int, preset.length if preset else DEFAULT_ID_LENGTH)
    if not 4 <= length <= 64:
        raise ConfigError(id_table.name("length"), "must be between 4 and 64")
    id_table.finish()
    session_id = SessionIdSpec(alphabet, length, preset.number_range if preset else None)

    if preset is not None:
        if not re.fullmatch(preset.id_rule, alphabet):
            raise ConfigError(
                id_table.name("alphabet"), f"{preset.name} ids are {preset.id_rule_text} only"
            )
        low, high = preset.id_lengths
        if preset.number_range is None and not low <= length <= high:
            span = f"exactly {low}" if low == high else f"{low}-{high}"
            raise ConfigError(
                id_table.name("length"), f"{preset.name} ids are {span} characters long"
            )
        if preset.lifetime_bounds is not None:
            low_s, high_s = preset.lifetime_bounds
            if not low_s <= lifetime <= high_s:
                raise ConfigError(
                    table.name("lifetime"),
                    f"{preset.name} sessions last {_span(low_s)} to {_span(high_s)}; "
                    f"got {_span(lifetime)}",
                )
        if preset.whole_minutes and lifetime % 60:
            raise ConfigError(
                table.name("lifetime"), f"{preset.name} takes whole minutes; got {_span(lifetime)}"
            )

    known = KNOWN_FIELDS | set(params) | set(session_params)
    templates = {}
    for field, default in (
        ("username", preset.username if preset else "{user}-session-{session}"),
        ("password", preset.password if preset else "{pass}"),
    ):
        try:
            templates[field] = Template.parse(table.pop_typed(field, str, default), known)
        except TemplateError as e:
            raise ConfigError(table.name(field), str(e)) from None
    username, password_template = templates["username"], templates["password"]
    if "session" not in username.fields | password_template.fields:
        raise ConfigError(
            table.name("username"),
            "neither username nor password contains {session}: sessions would not be sticky",
        )
    for field, template in (("username", username), ("password", password_template)):
        for needed in sorted(template.required_fields):
            if needed in params and not params[needed]:
                what = f"the {preset.name} preset" if preset else f"the {field} template"
                raise ConfigError(f"{table.name('params')}.{needed}", f"{what} needs a value")
            if needed in session_params and not session_params[needed]:
                raise ConfigError(
                    f"{table.name('session_params')}.{needed}",
                    f"{{{needed}}} is outside [...] in {field}, so it needs a default",
                )
    # Render with every session parameter absent and with every one present.
    longest = {key: "x" * 64 for key in session_params}
    for sample_params in ({}, longest):
        sample = {
            "user": user,
            "pass": password.value,
            "session": "9" * length,
            "port": "65535",
            "lifetime_s": str(round(lifetime)),
            "lifetime_m": str(round(lifetime / 60)),
            **params,
            **session_params,
            **sample_params,
        }
        if ":" in username.render(sample):
            raise ConfigError(table.name("username"), "the rendered username contains ':'")
        for field, template in (("username", username), ("password", password_template)):
            if len(template.render(sample).encode("utf-8")) > 255:
                raise ConfigError(table.name(field), "renders longer than 255 bytes")

    protocols = table.pop("protocols", ["http", "socks5", "socks4"])
    if (
        not isinstance(protocols, list)
        or not protocols
        or not all(p in ("http", "socks5", "socks4") for p in protocols)
    ):
        raise ConfigError(
            table.name("protocols"), 'expected a non-empty list of "http", "socks5", "socks4"'
        )
    users_table = _Table(table.pop("client_users", {}), table.name("client_users"))
    client_users = []
    for user_name in users_table.keys():
        if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", user_name):
            raise ConfigError(users_table.name(user_name), "user names are letters, digits, _.@-")
        secret = resolve_secret(users_table.pop(user_name), users_table.name(user_name), env)
        if not secret.value:
            raise ConfigError(users_table.name(user_name), "the password is empty")
        client_users.append((user_name, secret))
    open_proxy = table.pop_typed("open_proxy", bool, False)
    if not client_users and not open_proxy and not _is_loopback(bind):
        raise ConfigError(
            table.name("bind"),
            f"the ports would be an open proxy on {bind}: add client_users, bind to "
            "127.0.0.1, or set open_proxy = true if that is really meant",
        )
    socks_resolve = table.pop_typed("socks_resolve", str, "remote")
    if socks_resolve not in ("remote", "local"):
        raise ConfigError(table.name("socks_resolve"), 'expected "remote" or "local"')
    upstream_ca: tuple[bytes, ...] = ()
    if "upstream_ca" in table.keys():
        upstream_ca = parse_upstream_ca(
            table.pop("upstream_ca"), table.name("upstream_ca"), upstream
        )
    release = None
    if "release" in table.keys():
        from proxymap.vendors.release import parse_release

        release = parse_release(
            table.pop("release"),
            table.name("release"),
            preset.release if preset else None,
            params,
            session_params,
            env,
        )
    api = _session_api(_Table(table.pop("session_api", {}), table.name("session_api")), api_default)
    table.finish()
    return MappingConfig(
        name=name,
        ports=ports,
        bind=bind,
        upstream=upstream,
        user=user,
        password=password,
        username=username,
        password_template=password_template,
        lifetime=lifetime,
        session_id=session_id,
        connect_timeout=connect_timeout,
        session_api=api,
        preset=preset.name if preset else None,
        params=tuple(params.items()),
        session_params=tuple(session_params.items()),
        release=release,
        protocols=frozenset(protocols),
        socks_resolve=socks_resolve,
        client_users=tuple(client_users),
        upstream_ca=upstream_ca,
    )


#: The parameters each kind of server endpoint takes, in the order Twisted's
#: parsers take them positionally.
_ENDPOINT_PARAMS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": (
        "port",
        "privateKey",
        "certKey",
        "sslmethod",
        "interface",
        "backlog",
        "extraCertChain",
        "dhParameters",
    ),
    "unix": ("address", "mode", "backlog", "lockfile"),
}


def check_listen(listen: str, key: str) -> None:
    """
    Refuse a server endpoint description Twisted would not listen on, or
    would read otherwise than it looks: an unknown kind or parameter, a
    parameter given twice, a port outside 0-65535, a value that does not
    parse, an ``ssl:`` certificate that cannot be read.
    """
    from twisted.internet.endpoints import serverFromString

    kind, parts, params = _endpoint_parts(listen)
    known = _ENDPOINT_PARAMS.get(kind)
    if known is None:
        raise ConfigError(
            key, f'{listen!r} is not a server endpoint such as "{DEFAULT_ADMIN_LISTEN}"'
        )
    if len(parts) > len(known):
        raise ConfigError(key, f"{listen!r}: too many parts for a {kind} endpoint")
    names = [name for name, _ in params]
    for name in names:
        if name not in known:
            raise ConfigError(key, f"{listen!r}: {kind} endpoints take no {name!r}")
        if names.count(name) > 1 or known.index(name) < len(parts):
            raise ConfigError(
                key, f"{listen!r}: {name!r} is given twice (a colon in a value is written \\:)"
            )
    first = parts[0] if parts else dict(params).get(known[0])
    if not first:
        raise ConfigError(key, f"{listen!r}: a {kind} endpoint needs its {known[0]}")
    if kind != "unix" and not (first.isascii() and first.isdigit() and int(first) <= 65535):
        raise ConfigError(key, f"{listen!r}: {first!r} is not a port (0-65535)")
    try:
        # Parses the description (and loads an ssl: endpoint's certificate)
        # without listening: nothing here touches the reactor.
        serverFromString(None, listen)
    except Exception as e:  # whatever Twisted's parsers and OpenSSL raise
        if isinstance(e, OSError) and e.strerror:
            why = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        else:
            why = str(e) or type(e).__name__
        raise ConfigError(key, f"{listen!r} is not a server endpoint: {why}") from None


def _admin(table: _Table, env: MappingABC[str, str]) -> AdminConfig:
    listen = table.pop_typed("listen", str, DEFAULT_ADMIN_LISTEN).strip()
    if listen:
        check_listen(listen, table.name("listen"))
    health_open = table.pop_typed("health_open", bool, False)
    users_table = _Table(table.pop("users", {}), table.name("users"))
    users = []
    for name in list(users_table._data):
        if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", name):
            raise ConfigError(users_table.name(name), "user names are letters, digits, _.@-")
        users.append((name, resolve_secret(users_table.pop(name), users_table.name(name), env)))
    for name, secret in users:
        if not secret.value:
            raise ConfigError(users_table.name(name), "the password is empty")
    table.finish()
    if listen and not users and not listen_is_loopback(listen):
        raise ConfigError(
            table.name("listen"),
            f"the admin API would listen beyond loopback ({listen!r}) without users; "
            "add [admin.users] or bind it to 127.0.0.1",
        )
    return AdminConfig(listen=listen, users=tuple(users), health_open=health_open)


def parse_config(data: MappingABC[str, Any], env: MappingABC[str, str] | None = None) -> Config:
    """
    Validate a parsed TOML document into a :class:`Config`.
    """
    env = os.environ if env is None else env
    top = _Table(dict(data), "")
    api = _session_api(_Table(top.pop("session_api", {}), "session_api"), SessionAPIConfig())
    admin = _admin(_Table(top.pop("admin", {}), "admin"), env)
    limits = _limits(_Table(top.pop("limits", {}), "limits"))
    service_table = _Table(top.pop("service", {}), "service")
    service = ServiceConfig(
        grace=parse_duration(service_table.pop("grace", 10), service_table.name("grace")),
        state_file=service_table.pop_typed("state_file", str, ""),
    )
    service_table.finish()

    raw_mappings = top.pop("mapping", None)
    if raw_mappings is None:
        raise ConfigError("mapping", "at least one [[mapping]] is required")
    if not isinstance(raw_mappings, list):
        raise ConfigError("mapping", "write mappings as [[mapping]] tables")
    top.finish()

    mappings = tuple(
        _mapping(_Table(raw, f"mapping[{i}]"), i, api, env) for i, raw in enumerate(raw_mappings)
    )
    if not mappings:
        raise ConfigError("mapping", "at least one [[mapping]] is required")
    owners: dict[int, int] = {}
    names: set[str] = set()
    for i, mapping in enumerate(mappings):
        if mapping.name in names:
            raise ConfigError(f"mapping[{i}].name", f"{mapping.name!r} is used twice")
        names.add(mapping.name)
        for port in mapping.ports:
            if port in owners:
                raise ConfigError(
                    f"mapping[{i}].ports",
                    f"port {port} is also mapped by {mappings[owners[port]].name!r}",
                )
            owners[port] = i
    _refuse_loops(mappings, owners)
    return Config(mappings=mappings, session_api=api, admin=admin, limits=limits, service=service)


def _addresses(host: str) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    if host == "localhost":
        # As proxymap connects to it and Twisted binds it: IPv4.
        return frozenset({ipaddress.ip_address("127.0.0.1")})
    try:
        return frozenset({ipaddress.ip_address(host)})
    except ValueError:
        return frozenset()


def reaches(upstream: Upstream, bind: str) -> bool:
    """
    Whether connecting to ``upstream``'s host reaches a socket this host
    binds to ``bind``, as far as the addresses written show: the same
    address, or a loopback (or unspecified) address for a wildcard bind.
    Names other than ``localhost`` are not looked up, so they never match.
    """
    targets = _addresses(upstream.host)
    binds = _addresses(bind)
    if targets & binds:
        return True
    if any(address.is_unspecified for address in binds):
        # "0.0.0.0" takes any IPv4 address of this host; "::" any address
        # (Twisted leaves IPV6_V6ONLY off).  Loopback ones are surely ours.
        wide = any(address.version == 6 for address in binds)
        return any(
            (address.is_loopback or address.is_unspecified) and (wide or address.version == 4)
            for address in targets
        )
    return False


def _refuse_loops(mappings: tuple[MappingConfig, ...], owner: Mapping[int, int]) -> None:
    """
    Refuse a mapping whose upstream is, through its own ports or through
    other mappings', proxymap itself: each request would come back as a new
    client connection, without end, until ``max_connections`` ran out.  A
    chain of mappings that ends at a vendor is allowed.  ``owner`` gives the
    index of the mapping of each port.
    """

    def next_hop(index: int) -> int | None:
        mapping = mappings[index]
        target = owner.get(mapping.upstream.port)
        if target is None or not reaches(mapping.upstream, mappings[target].bind):
            return None
        return target

    for start, mapping in enumerate(mappings):
        path = [start]
        hop = next_hop(start)
        while hop is not None and hop not in path:
            path.append(hop)
            hop = next_hop(hop)
        if hop != start:
            continue
        first = path[1] if len(path) > 1 else start
        where = (
            f"port {mapping.upstream.port} of this mapping"
            if first == start
            else f"port {mapping.upstream.port} of mapping {mappings[first].name!r}, "
            "whose upstream leads back here ("
            + " -> ".join(mappings[index].name for index in [*path, start])
            + ")"
        )
        raise ConfigError(
            f"mapping[{start}].upstream",
            f"{mapping.upstream.address} is {where}: requests would loop through "
            "proxymap without end",
        )


def load_config(path: str | os.PathLike[str], env: MappingABC[str, str] | None = None) -> Config:
    """
    Read and validate a configuration file.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_FILE + 1)
    except OSError as e:
        raise ConfigError("", f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_FILE:  # /dev/zero, say, which would fill the memory
        raise ConfigError("", f"{path} is longer than {MAX_CONFIG_FILE} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("", f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{path} is not valid TOML: {e}") from None
    return parse_config(data, env)
