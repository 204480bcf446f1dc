"""
Configuration: valid files load; every problem is one message naming its key.
"""

from __future__ import annotations

import copy
import datetime
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxymap.config import (
    ConfigError,
    Secret,
    Upstream,
    expand_alphabet,
    load_config,
    parse_config,
    parse_duration,
    parse_ports,
    reaches,
    toml_key,
)
from proxymap.dataplane.localtls import LocalCertificates

from .helpers import FUZZ_EXAMPLES

if sys.version_info >= (3, 11):
    import tomllib
else:  # PyPy 3.9, as in proxymap.config
    import tomli as tomllib

EXAMPLE = Path(__file__).parent.parent / "examples" / "proxymap.toml"


def base(**overrides: Any) -> dict[str, Any]:
    m = {
        "ports": "10201-10203",
        "upstream": "http://gw.example.com:10000",
        "user": "alice",
        "pass": "s3cret",
    }
    m.update(overrides)
    return {"mapping": [m]}


def error(data: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data, env=env or {})
    return str(e.value)


def test_defaults() -> None:
    c = parse_config(base(), env={})
    m = c.mappings[0]
    assert m.name == "mapping-0"
    assert m.ports == (10201, 10202, 10203)
    assert m.bind == "127.0.0.1"
    assert (m.upstream.host, m.upstream.port) == ("gw.example.com", 10000)
    assert m.lifetime == 600
    assert m.session_id.length == 8 and len(m.session_id.alphabet) == 52
    assert m.username.source == "{user}-session-{session}"
    assert m.password_template.source == "{pass}"
    assert c.session_api.enabled is False and c.session_api.domain == "portmapper"
    assert c.admin.listen == "tcp:8700:interface=127.0.0.1"


def test_example_file_loads() -> None:
    c = load_config(EXAMPLE, env={"VENDOR_A_PASSWORD": "x", "PROXYMAP_ADMIN_PASSWORD": "y"})
    assert c.mappings[0].name == "vendor-a"
    assert len(c.mappings[0].ports) == 100


@pytest.mark.parametrize("path", sorted(EXAMPLE.parent.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_loads(path: Path) -> None:
    """
    The shipped examples stay valid as the configuration grows.
    """

    class AnyEnv(dict[str, str]):
        def __contains__(self, key: object) -> bool:
            return True

        def __getitem__(self, key: str) -> str:
            return "example-secret"

    assert load_config(path, env=AnyEnv()).mappings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600), ("90s", 90), ("1h30m", 5400), ("250ms", 0.25), (45, 45), ("1.5m", 90)],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text, "k") == seconds


@pytest.mark.parametrize("bad", ["10", "m", "10 minutes", "-5s", "0s", True, [1]])
def test_bad_durations(bad: Any) -> None:
    with pytest.raises(ConfigError):
        parse_duration(bad, "k")


def test_ports_forms() -> None:
    assert parse_ports([10201, "10300-10302"], "k") == (10201, 10300, 10301, 10302)
    assert parse_ports(8080, "k") == (8080,)


def test_alphabet_ranges() -> None:
    assert expand_alphabet("a-c0-2", "k") == "abc012"
    assert expand_alphabet("A-Za-z0-9_", "k").endswith("9_")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "mapping: at least one [[mapping]] is required"),
        ({"mapping": [], "x": 1}, "x: unknown key"),
        (base(colour="red"), "mapping[0].colour: unknown key"),
        (base(ports="10300-10201"), "mapping[0].ports: range '10300-10201' ends before it starts"),
        (base(ports="abc"), "mapping[0].ports: 'abc' is not a port or a range"),
        (base(ports=[70000]), "mapping[0].ports: port 70000 is outside 1-65535"),
        (base(ports=[1, 1]), "mapping[0].ports: port 1 is listed twice"),
        (
            base(upstream="socks4://h:1"),
            "mapping[0].upstream: unsupported scheme 'socks4' (supported: http, https, socks5)",
        ),
        (base(upstream="http://u:p@h:1"), "mapping[0].upstream: put upstream credentials"),
        (base(upstream="nonsense"), "mapping[0].upstream: 'nonsense' is not a URL"),
        (base(lifetime="soon"), "mapping[0].lifetime: 'soon' is not a duration"),
        (base(lifetime=float("nan")), 'mapping[0].lifetime: expected a duration such as "10m"'),
        (base(lifetime=float("inf")), "mapping[0].lifetime: must be at most 365d"),
        (base(lifetime="366d"), "mapping[0].lifetime: must be at most 365d"),
        (base(protocols=[["http"]]), 'mapping[0].protocols: expected a non-empty list of "http"'),
        (base(username="{user}-{sesion}"), "mapping[0].username: unknown placeholder {sesion}"),
        (base(username="{user}"), "mapping[0].username: neither username nor password"),
        (base(username="{user}:{session}"), "mapping[0].username: the rendered username contains"),
        (base(username="{user}-session-{session"), "mapping[0].username: unmatched '{'"),
        (base(session_id={"length": 2}), "mapping[0].session_id.length: must be between 4 and 64"),
        (base(session_id={"alphabet": "a:b"}), "mapping[0].session_id.alphabet: character ':'"),
        (base(session_id={"size": 8}), "mapping[0].session_id.size: unknown key"),
        (base(bind=5), "mapping[0].bind: expected a string"),
        (base(bind="proxy.example.com"), "mapping[0].bind: 'proxy.example.com' is not an IP"),
        (base(bind=""), "mapping[0].bind: '' is not an IP address (0.0.0.0 listens"),
        (base(bind="256.1.1.1"), "mapping[0].bind: '256.1.1.1' is not an IP address"),
        (base(params={"\n": "x"}), 'mapping[0].params."\\u000A": names are lowercase'),
        ({**base(), "x.y": 1}, '"x.y": unknown key'),
        (base(name="has space"), "mapping[0].name: use letters"),
        (base(upstream=None), "mapping[0].upstream: expected a URL"),
        ({"mapping": [{"ports": "1-2"}]}, "mapping[0].upstream: is required"),
        (base(**{"pass": "env:NOPE"}), "mapping[0].pass: environment variable NOPE is not set"),
        ({"session_api": {"domain": "bad domain"}, **base()}, "session_api.domain: 'bad domain'"),
        ({"session_api": {"domain": "."}, **base()}, "session_api.domain: '.' is not a host"),
        ({"admin": {"port": 1}, **base()}, "admin.port: unknown key"),
        (base(user="u" * 300), "mapping[0].username: renders longer than 255 bytes"),
    ],
)
def test_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    assert error(data).startswith(message)


def test_an_https_upstream_and_its_ca(tmp_path: Path) -> None:
    m = parse_config(base(upstream="https://gw.example.com"), env={}).mappings[0]
    assert (m.upstream.scheme, m.upstream.port, m.upstream_ca) == ("https", 443, ())
    pem = LocalCertificates().pem("gw.example.com")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"# the vendor's authority\n" + pem + pem)
    m = parse_config(
        base(upstream="https://gw.example.com:7777", upstream_ca=str(ca)), env={}
    ).mappings[0]
    assert m.upstream.port == 7777 and m.upstream_ca == (pem.strip(), pem.strip())


@pytest.mark.parametrize(
    ("upstream", "problem"),
    [
        ("http://gw example.com:1", "'gw example.com' is not a host name"),
        ("http://-gw.example.com:1", "'-gw.example.com' is not a host name"),
        ("http://gw..example.com:1", "'gw..example.com' is not a host name"),
        ("http://[10.0.0.1]:1", "'10.0.0.1' is not an IPv6 address"),
        # getaddrinfo would read these as 127.0.0.1, the loop check not.
        ("http://127.1:1", "'127.1' is neither a host name nor an IP address written in full"),
        ("http://0x7f.1:1", "'0x7f.1' is neither a host name nor an IP address"),
        ("http://10.0.0.256:1", "'10.0.0.256' is neither a host name nor an IP address"),
        # A certificate cannot name it: every request failed its TLS check.
        ("https://gw_1.example.com:1", "'gw_1.example.com' cannot be checked against a cert"),
    ],
)
def test_upstream_hosts_are_names_or_addresses(upstream: str, problem: str) -> None:
    assert error(base(upstream=upstream)).startswith(f"mapping[0].upstream: {problem}")


@pytest.mark.parametrize(
    ("upstream", "host"),
    [
        ("http://gw_1.internal:1", "gw_1.internal"),
        ("https://gw.example.com.:1", "gw.example.com."),
        ("https://bücher.example:1", "bücher.example"),
        ("socks5://1a.example:1", "1a.example"),
        ("https://[::1]:1", "::1"),
        ("http://192.0.2.7:1", "192.0.2.7"),
    ],
)
def test_upstream_hosts_accepted(upstream: str, host: str) -> None:
    assert parse_config(base(upstream=upstream), env={}).mappings[0].upstream.host == host


def test_upstream_ca_errors_name_the_key(tmp_path: Path) -> None:
    https = "https://gw.example.com"
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificates here\n")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    key = "mapping[0].upstream_ca: "
    for data, message in [
        (base(upstream_ca=str(empty)), "only an https:// upstream is reached over TLS"),
        (base(upstream=https, upstream_ca=str(tmp_path / "none.pem")), "cannot read "),
        (base(upstream=https, upstream_ca=str(empty)), f"{empty} holds no PEM certificate"),
        (
            base(upstream=https, upstream_ca=str(broken)),
            f"{broken} holds a certificate that does not parse",
        ),
        (base(upstream=https, upstream_ca=5), "expected the path of a PEM file"),
    ]:
        assert error(data).startswith(key + message)


def test_overlapping_ports_between_mappings() -> None:
    data = base(name="a")
    data["mapping"].append(dict(data["mapping"][0], name="b", ports="10203-10210"))
    assert error(data) == "mapping[1].ports: port 10203 is also mapped by 'a'"


def test_an_upstream_on_its_own_ports_is_refused() -> None:
    for host in ("127.0.0.1", "localhost"):
        data = base(name="a", upstream=f"http://{host}:10202")
        assert error(data) == (
            f"mapping[0].upstream: {host}:10202 is port 10202 of this mapping: "
            "requests would loop through proxymap without end"
        )
    data = base(name="a", upstream="socks5://[::1]:10203", bind="::1")
    assert error(data).startswith("mapping[0].upstream: [::1]:10203 is port 10203 of this")


def test_mappings_whose_upstreams_form_a_circle_are_refused() -> None:
    data = base(name="a", upstream="http://127.0.0.1:10301")
    data["mapping"].append(dict(data["mapping"][0], name="b", ports="10301-10302"))
    data["mapping"][1]["upstream"] = "http://127.0.0.1:10202"
    assert error(data) == (
        "mapping[0].upstream: 127.0.0.1:10301 is port 10301 of mapping 'b', whose upstream "
        "leads back here (a -> b -> a): requests would loop through proxymap without end"
    )
    # A mapping leading into the circle from outside it: the circle is named.
    data["mapping"].insert(0, dict(data["mapping"][0], name="c", ports="10401"))
    assert error(data).startswith(
        "mapping[1].upstream: 127.0.0.1:10301 is port 10301 of mapping 'b', whose upstream "
        "leads back here (a -> b -> a)"
    )


def test_a_chain_of_mappings_ending_at_a_vendor_is_allowed() -> None:
    data = base(name="a", upstream="http://127.0.0.1:10301")
    data["mapping"].append(dict(data["mapping"][0], name="b", ports="10301-10302"))
    data["mapping"][1]["upstream"] = "http://gw.example.com:10000"
    assert [m.name for m in parse_config(data, env={}).mappings] == ["a", "b"]
    # Another address or another port of this host is not proxymap's.
    for upstream in ("http://127.0.0.2:10202", "http://127.0.0.1:10200"):
        assert parse_config(base(upstream=upstream), env={}).mappings[0].upstream.port > 0


@pytest.mark.parametrize(
    ("host", "bind", "reached"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("localhost", "127.0.0.1", True),
        ("localhost", "::1", False),
        ("127.0.0.2", "127.0.0.1", False),
        ("::1", "127.0.0.1", False),
        ("192.0.2.1", "192.0.2.1", True),
        ("127.0.0.1", "0.0.0.0", True),
        ("0.0.0.0", "0.0.0.0", True),
        ("::1", "0.0.0.0", False),
        ("::1", "::", True),
        ("127.0.0.1", "::", True),
        ("192.0.2.1", "0.0.0.0", False),
        ("gw.example.com", "0.0.0.0", False),
        ("127.0.0.1", "localhost", True),
    ],
)
def test_which_upstream_hosts_reach_a_bind_address(host: str, bind: str, reached: bool) -> None:
    assert reaches(Upstream("http", host, 10201), bind) is reached


def test_duplicate_mapping_names() -> None:
    data = base(name="a")
    data["mapping"].append(dict(data["mapping"][0], ports="20000"))
    assert error(data) == "mapping[1].name: 'a' is used twice"


def test_secret_references(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    c = parse_config(base(**{"pass": f"file:{tmp_path / 'pw'}"}), env={})
    assert c.mappings[0].password.value == "from-file"
    c = parse_config(base(**{"pass": "env:PW"}), env={"PW": "from-env"})
    assert c.mappings[0].password.value == "from-env"
    missing = tmp_path / "missing"
    assert error(base(**{"pass": f"file:{missing}"})).startswith(
        f"mapping[0].pass: cannot read {missing}"
    )


@pytest.mark.parametrize(
    "value, problem",
    [
        ("env:", 'name the environment variable: "env:NAME"'),
        ("file:", 'name the file: "file:PATH"'),
        ("file:/dev/zero", "/dev/zero is not a regular file"),
        ("file:{tmp}/fifo", "{tmp}/fifo is not a regular file"),
        ("file:{tmp}/long", "{tmp}/long is longer than 65536 bytes"),
        ("file:{tmp}/binary", "{tmp}/binary is not UTF-8 text"),
        ("file:{tmp}", "cannot read {tmp}: Is a directory"),
    ],
)
def test_a_secret_reference_that_cannot_be_a_secret(
    tmp_path: Path, value: str, problem: str
) -> None:
    """
    One line naming the key, not a traceback, and never a read that does
    not end: a FIFO without a writer would block start-up, /dev/zero fill
    the memory.
    """
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "long").write_bytes(b"x" * (64 * 1024 + 1))
    (tmp_path / "binary").write_bytes(b"\xff\xfepw")
    data = base(**{"pass": value.format(tmp=tmp_path)})
    assert error(data) == f"mapping[0].pass: {problem.format(tmp=tmp_path)}"


def test_a_configuration_file_that_does_not_end_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        load_config("/dev/zero")
    assert str(e.value) == "/dev/zero is longer than 16777216 bytes"


def test_secrets_never_in_repr() -> None:
    c = parse_config(base(**{"pass": "hunter2-very-secret"}), env={})
    assert "hunter2" not in repr(c)
    assert "hunter2" not in str(Secret("hunter2"))


def test_session_api_override_per_mapping() -> None:
    data = base(session_api={"domain": "ctl.local"})
    data["session_api"] = {"enabled": True}
    m = parse_config(data, env={}).mappings[0]
    assert m.session_api.enabled is True and m.session_api.domain == "ctl.local"


def test_session_api_domain_fully_qualified_is_the_same_name() -> None:
    data = base()
    data["session_api"] = {"domain": "PortMapper."}
    assert parse_config(data, env={}).mappings[0].session_api.domain == "portmapper"


def test_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[mapping]\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_admin_users_and_listen() -> None:
    c = parse_config({**base(), "admin": {"users": {"ops": "env:PW"}}}, env={"PW": "pw"})
    assert [(name, secret.value) for name, secret in c.admin.users] == [("ops", "pw")]
    assert "pw" not in repr(c.admin)
    assert parse_config({**base(), "admin": {"listen": ""}}, env={}).admin.listen == ""
    off_host = {"listen": "tcp:8700:interface=0.0.0.0", "users": {"ops": "pw"}}
    assert parse_config({**base(), "admin": off_host}, env={}).admin.users


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        ({"listen": "tcp:8700"}, "admin.listen: the admin API would listen beyond loopback"),
        ({"listen": "tcp:8700:interface=10.1.2.3"}, "admin.listen: the admin API would listen"),
        ({"listen": "carrier-pigeon:1"}, "admin.listen: 'carrier-pigeon:1' is not a server"),
        ({"users": {"ops": ""}}, "admin.users.ops: the password is empty"),
        ({"users": {"bad name": "x"}}, 'admin.users."bad name": user names are'),
        ({"listen": "tcp:8700:interface=127.0.0.1:bogus=1"}, "tcp endpoints take no 'bogus'"),
        ({"listen": "tcp:http:interface=127.0.0.1"}, "'http' is not a port (0-65535)"),
        ({"listen": "tcp:70000:interface=127.0.0.1"}, "'70000' is not a port (0-65535)"),
        ({"listen": "tcp:interface=127.0.0.1"}, "a tcp endpoint needs its port"),
        ({"listen": "unix:"}, "a unix endpoint needs its address"),
        ({"listen": "tcp:1:interface=127.0.0.1:backlog=x"}, "is not a server endpoint: invalid"),
        ({"listen": "unix:/run/a.sock:mode=rw"}, "is not a server endpoint: invalid literal"),
        ({"listen": "tcp:1:127.0.0.1:2:3"}, "too many parts for a tcp endpoint"),
        # Twisted reads the last interface: this one would listen on every one.
        ({"listen": "tcp:1:interface=127.0.0.1:interface=0.0.0.0"}, "'interface' is given twice"),
        ({"listen": "tcp:1:127.0.0.1:interface=0.0.0.0"}, "'interface' is given twice"),
        ({"listen": "tcp6:1:interface=::1"}, "'interface' is given twice (a colon in a value"),
        ({"listen": "ssl:8443:privateKey=/no/such.pem"}, "No such file or directory: /no/such.pem"),
        ({"users": {"ops": "env:NOPE"}}, "admin.users.ops: environment variable NOPE is not set"),
    ],
)
def test_admin_errors(admin: dict[str, Any], message: str) -> None:
    text = error({**base(), "admin": admin})
    assert text.startswith("admin.") and message in text


@pytest.mark.parametrize(
    "listen",
    [
        "tcp:8700:interface=127.0.0.1",
        "tcp:port=8700:interface=127.0.0.1:backlog=10",
        "tcp:8700:127.0.0.1",
        "tcp6:8700:interface=\\:\\:1",
        "unix:/run/proxymap/admin.sock:mode=600:lockfile=0",
        "unix:address=/run/proxymap/admin.sock",
    ],
)
def test_admin_listen_accepted(listen: str) -> None:
    assert parse_config({**base(), "admin": {"listen": listen}}, env={}).admin.listen == listen


@pytest.mark.parametrize(
    ("bind", "read"),
    [("localhost", "127.0.0.1"), (" ::1 ", "::1"), ("0:0::1", "::1"), ("127.0.0.2", "127.0.0.2")],
)
def test_bind_is_an_address(bind: str, read: str) -> None:
    assert parse_config(base(bind=bind), env={}).mappings[0].bind == read


@pytest.mark.parametrize(
    ("field", "written"),
    [
        ("plain_key-1", "plain_key-1"),
        ("a b", '"a b"'),
        ("x.y", '"x.y"'),
        ('say "hi"\\', '"say \\"hi\\"\\\\"'),
        ("ünïcode", '"ünïcode"'),
        ("line\nbreak\x00\u2028", '"line\\u000Abreak\\u0000\\u2028"'),
        ("", '""'),
    ],
)
def test_keys_are_named_as_toml_writes_them(field: str, written: str) -> None:
    """
    A message names a key the way the file would spell it, so it stays one
    line and can be searched for, whatever the key holds.
    """
    assert toml_key(field) == written
    assert tomllib.loads(f"{written} = 1") == {field: 1}


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("tcp:8700:interface=127.0.0.1", True),
        ("tcp6:8700:interface=\\:\\:1", True),
        ("unix:/run/proxymap/admin.sock", True),
        ("tcp:8700:interface=localhost", True),
        ("tcp:8700:127.0.0.1", True),
        ("tcp:8700:interface=127.0.0.1:interface=0.0.0.0", False),
        ("tcp:8700", False),
        ("tcp:8700:interface=0.0.0.0", False),
        ("tcp:8700:interface=192.0.2.1", False),
    ],
)
def test_listen_is_loopback(listen: str, loopback: bool) -> None:
    from proxymap.config import listen_is_loopback

    assert listen_is_loopback(listen) is loopback


# ---------------------------------------------------------------- any file at all

_EXAMPLES = [tomllib.loads(p.read_text()) for p in sorted(EXAMPLE.parent.glob("*.toml"))]

#: Every name the parsers use (and more): a key added by the fuzz test below
#: is one of them as often as not, so keys no example sets (commented out in
#: them, or not shown) are tried with any value too.
_NAMES = sorted(
    {
        name
        for module in ("config.py", "vendors/release.py", "vendors/presets.py")
        for name in re.findall(
            r'"([a-z][a-z_]*)"', (Path(__file__).parents[1] / "proxymap" / module).read_text()
        )
    }
)

_TRICKY_STRINGS = [
    "", "0", "-1", "10s", "0s", "1e400s", "nan", "inf", "1-0", "65535-65536", "a-z", "\x00",
    "env:", "file:", "file:/", "file:/nonexistent", "tcp:0", "tcp:1:interface=a:interface=b",
    "file:/dev/zero", "unix:", "http://[::1]:1", "http://h:0", "http://h:99999", "http://:1", "socks5://h",
    "https://h", "{session}", "{", "}", "{x}", "{user!r}", "{user:>300}", "{0}", "{user[0]}",
    "localhost", "::", "line\nbreak",
]  # fmt: skip

_VALUES = st.recursive(
    st.one_of(
        st.text(max_size=20),
        st.sampled_from(_TRICKY_STRINGS),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(),
        st.booleans(),
        st.datetimes(),
        st.dates(),
        st.times(),
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _places(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, inner in items:
        yield (*path, key)
        yield from _places(inner, (*path, key))


@st.composite
def _mutated_examples(draw: st.DrawFn) -> dict[str, Any]:
    """
    A shipped example with one to three values replaced by anything TOML can
    hold, or removed, or a key added.
    """
    data = copy.deepcopy(draw(st.sampled_from(_EXAMPLES)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from([(), *_places(data)]))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        change = draw(st.sampled_from(["replace", "remove", "add"]))
        if change == "add" or not path:
            target = parent[path[-1]] if path else data
            if isinstance(target, dict):
                name = draw(st.sampled_from(_NAMES) | st.text(max_size=8))
                target[name] = draw(_VALUES)
        elif change == "remove" and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_VALUES)
    return data


class _AnyEnv(dict[str, str]):
    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> str:
        return "example-secret"


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(_mutated_examples())
def test_any_file_loads_or_names_one_key(data: dict[str, Any]) -> None:
    """
    Whatever a file holds, it loads, or it is refused with one line naming
    a key: never another exception (a traceback for the user).
    """
    try:
        parse_config(data, env=_AnyEnv())
    except ConfigError as e:
        assert e.key and e.problem
        assert "\n" not in str(e) and "\r" not in str(e)


_ODD_VALUES = [
    [["http"]],
    [{}],
    [{"a": 1}],
    {"a": []},
    [1, "a"],
    [],
    {},
    "",
    -1,
    2**63 - 1,
    1.5,
    float("nan"),
    True,
    datetime.datetime(2026, 1, 1),
    datetime.time(1, 2),
]


@pytest.mark.parametrize("name", _NAMES)
def test_any_key_with_an_odd_value_loads_or_names_the_key(name: str) -> None:
    """
    Every name the parser knows, with each value TOML can hold that a
    careless check might not expect (a list of tables where strings go, an
    empty table, NaN), at each level a table can sit: it loads or is refused
    with one line naming a key, never a traceback.
    """
    release = {"user": "api", "pass": "pw"}
    for value in _ODD_VALUES:
        for data in (
            {**base(), name: value},
            base(**{name: value}),
            base(preset="geonode", release={**release, name: value}),
            {**base(), "admin": {name: value}},
            {**base(), "session_api": {name: value}},
            {**base(), "service": {name: value}},
            base(session_id={name: value}),
            base(limits={name: value}),
        ):
            try:
                parse_config(data, env=_AnyEnv())
            except ConfigError as e:
                assert e.key and e.problem and "\n" not in str(e), (data, str(e))
