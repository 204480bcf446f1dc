"""
Vendor presets: golden renderings and load-time validation.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxymap.config import ConfigError, parse_config
from proxymap.credentials import Template, TemplateError
from proxymap.sessions import InvalidParameter, PortPolicy, secure_id
from proxymap.vendors.presets import PRESETS


def mapping(preset: str, **extra: Any) -> Any:
    raw = {
        "ports": "10201",
        "upstream": "http://gw.example:1",
        "user": "alice",
        "pass": "pw",
        "preset": preset,
        "lifetime": "30m",
        **extra,
    }
    return parse_config({"mapping": [raw]}, env={}).mappings[0]


def render(m: Any, session: str, **params: str) -> tuple[str, str]:
    policy = PortPolicy(m)
    return policy.credentials(session, 10201, policy.session_params(params))


GOLDEN = [
    ("geonode", {}, {}, ("alice-session-S1-lifetime-30", "pw")),
    ("geonode", {}, {"country": "us"}, ("alice-country-us-session-S1-lifetime-30", "pw")),
    (
        "brightdata",
        {"params": {"customer": "hl_1", "zone": "res"}},
        {},
        ("brd-customer-hl_1-zone-res-session-S1", "pw"),
    ),
    (
        "brightdata",
        {"params": {"customer": "hl_1", "zone": "res"}},
        {"country": "DE"},
        ("brd-customer-hl_1-zone-res-country-de-session-S1", "pw"),
    ),
    ("oxylabs", {}, {}, ("customer-alice-sessid-S1-sesstime-30", "pw")),
    ("oxylabs", {}, {"country": "de"}, ("customer-alice-cc-DE-sessid-S1-sesstime-30", "pw")),
    ("decodo", {}, {}, ("user-alice-session-S1-sessionduration-30", "pw")),
    (
        "decodo",
        {},
        {"country": "GB"},
        ("user-alice-country-gb-session-S1-sessionduration-30", "pw"),
    ),
    ("iproyal", {}, {}, ("alice", "pw_session-S1234567_lifetime-30m")),
    ("iproyal", {}, {"country": "BR"}, ("alice", "pw_country-br_session-S1234567_lifetime-30m")),
    (
        "soax",
        {"params": {"package": "123"}},
        {},
        ("package-123-sessionid-S1-sessionlength-1800", "pw"),
    ),
    (
        "soax",
        {"params": {"package": "123"}},
        {"country": "Fr"},
        ("package-123-country-fr-sessionid-S1-sessionlength-1800", "pw"),
    ),
    ("netnut", {}, {}, ("alice-res-any-sid-12345", "pw")),
    ("netnut", {}, {"country": "US"}, ("alice-res-us-sid-12345", "pw")),
]


@pytest.mark.parametrize(("preset", "extra", "params", "expected"), GOLDEN)
def test_golden(
    preset: str, extra: dict[str, Any], params: dict[str, str], expected: tuple[str, str]
) -> None:
    session = {"iproyal": "S1234567", "netnut": "12345"}.get(preset, "S1")
    assert render(mapping(preset, **extra), session, **params) == expected


def test_every_preset_has_a_golden_rendering() -> None:
    assert {g[0] for g in GOLDEN} == set(PRESETS)


def test_netnut_ids_are_numbers_in_range() -> None:
    m = mapping("netnut")
    ids = [int(secure_id(m.session_id)) for _ in range(200)]
    assert all(10000 <= i <= 999999999 for i in ids)


def test_override_any_part() -> None:
    m = mapping(
        "oxylabs",
        username="customer-{user}-sessid-{session}",
        lifetime="10m",
        session_id={"alphabet": "a-z", "length": 12},
    )
    assert render(m, "abc") == ("customer-alice-sessid-abc", "pw")
    assert m.session_id.length == 12


def test_session_params_declared_with_defaults() -> None:
    m = mapping(
        "geonode",
        session_params={"country": "us", "city": ""},
        username="{user}[-country-{country}][-city-{city}]-session-{session}",
    )
    assert render(m, "S") == ("alice-country-us-session-S", "pw")
    assert render(m, "S", city="paris", country="") == ("alice-city-paris-session-S", "pw")
    with pytest.raises(InvalidParameter, match="not a session parameter"):
        render(m, "S", state="ny")
    with pytest.raises(InvalidParameter, match="letters, digits"):
        render(m, "S", country="u s")


@pytest.mark.parametrize(
    ("preset", "extra", "message"),
    [
        ("nope", {}, "mapping[0].preset: unknown preset 'nope' (known: brightdata, decodo,"),
        (
            "geonode",
            {"lifetime": "2m"},
            "mapping[0].lifetime: geonode sessions last 3m to 1d; got 2m",
        ),
        ("geonode", {"lifetime": "25h"}, "mapping[0].lifetime: geonode sessions last 3m"),
        (
            "oxylabs",
            {"lifetime": "90s"},
            "mapping[0].lifetime: oxylabs takes whole minutes; got 90s",
        ),
        ("decodo", {"lifetime": "2d"}, "mapping[0].lifetime: decodo sessions last 1m to 1d"),
        ("iproyal", {"lifetime": "8d"}, "mapping[0].lifetime: iproyal sessions last 1m to 7d"),
        (
            "iproyal",
            {"session_id": {"length": 10}},
            "mapping[0].session_id.length: iproyal ids are exactly 8 characters long",
        ),
        (
            "geonode",
            {"session_id": {"length": 30}},
            "mapping[0].session_id.length: geonode ids are 1-25 characters long",
        ),
        (
            "brightdata",
            {"params": {"zone": "z"}},
            "mapping[0].params.customer: the brightdata preset needs a value",
        ),
        (
            "brightdata",
            {"params": {"customer": "c", "zone": "z"}, "session_id": {"alphabet": "a-z_"}},
            "mapping[0].session_id.alphabet: brightdata ids are letters and digits only",
        ),
        ("soax", {}, "mapping[0].params.package: the soax preset needs a value"),
        (
            "geonode",
            {"session_params": {"country": "u s"}},
            "mapping[0].session_params.country: use at most 64",
        ),
        ("geonode", {"params": {"session": "x"}}, "mapping[0].params: 'session' is taken"),
        (
            "geonode",
            {"username": "{user}-{country}-session-{session}"},
            "mapping[0].session_params.country: {country} is outside [...] in username",
        ),
        (
            "geonode",
            {"username": "{user}-session-{session}-{city}"},
            "mapping[0].username: unknown placeholder {city}",
        ),
    ],
)
def test_validation(preset: str, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        mapping(preset, **extra)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize(
    "bad",
    [
        "{user",
        "[{user}",
        "{user}]",
        "[-x-]",
        "[[{user}][{pass}]]x]",
        "[a[{user}]]",
        "{user|title}",
        "{user|default}",
        "{user|lower:x}",
    ],
)
def test_template_errors(bad: str) -> None:
    with pytest.raises(TemplateError):
        Template.parse(bad)


def test_literal_brackets_and_braces() -> None:
    t = Template.parse("[[{user}]]{{x}}")
    assert t.render({"user": "u"}) == "[u]{x}"
