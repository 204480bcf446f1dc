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
