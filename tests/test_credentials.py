from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxymap.credentials import (
    Template,
    TemplateError,
    basic_authorization,
    parse_basic_authorization,
)


def test_render() -> None:
    t = Template.parse("{user}-session-{session}-p{port}{{x}}")
    assert t.fields == {"user", "session", "port"}
    assert t.render({"user": "a", "session": "S", "port": "1"}) == "a-session-S-p1{x}"


@pytest.mark.parametrize("bad", ["{nope}", "{user", "user}", "{user.__class__}"])
def test_bad_templates(bad: str) -> None:
    with pytest.raises(TemplateError):
        Template.parse(bad)


@given(st.text().filter(lambda u: ":" not in u), st.text())
def test_basic_round_trip(user: str, password: str) -> None:
    assert parse_basic_authorization(basic_authorization(user, password)) == (user, password)


@given(st.binary())
def test_parse_basic_never_raises(value: bytes) -> None:
    parse_basic_authorization(value)


@pytest.mark.parametrize(
    "value",
    [
        b"Bearer dTpw",  # another scheme
        b"Basic dTpw!",  # not base64
        b"Basic //79",  # not UTF-8 (ff fe fd)
        b"Basic dXNlcg==",  # "user": no colon, so no password
    ],
)
def test_what_is_not_basic_credentials(value: bytes) -> None:
    """
    Such a header is no credentials at all (and so a 407 where they are
    needed), never a user with a guessed password.
    """
    assert parse_basic_authorization(value) is None


def test_basic_scheme_is_case_insensitive_and_the_password_may_hold_colons() -> None:
    assert parse_basic_authorization(b"bAsIc  dTpwOjE=") == ("u", "p:1")
