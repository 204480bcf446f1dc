"""
The session registry on a Clock.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.task import Clock

from proxymap.config import SessionIdSpec
from proxymap.credentials import parse_basic_authorization
from proxymap.sessions import (
    EndReason,
    IdSpaceExhausted,
    NoSuchPort,
    PortPolicy,
    Session,
    SessionRegistry,
    secure_id,
    spelled_as,
)

from .helpers import counting_ids, mapping

PORTS = (10201, 10202, 10203)


def registry(clock: Clock, **overrides: Any) -> SessionRegistry:
    reg = SessionRegistry(clock=clock, new_id=overrides.pop("new_id", counting_ids()))
    policy = PortPolicy(mapping(**overrides))
    for port in PORTS:
        reg.add_port(port, policy)
    return reg


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, EndReason | None]] = []

    def session_started(self, session: Session) -> None:
        self.events.append(("started", session.id, None))

    def session_ended(self, session: Session, reason: EndReason) -> None:
        self.events.append(("ended", session.id, reason))


def test_created_lazily_and_sticky() -> None:
    clock = Clock()
    reg = registry(clock)
    assert reg.peek(10201) is None
    assert reg.list() == []
    s = reg.current(10201)
    assert reg.current(10201) is s
    assert reg.peek(10201) is s
    assert reg.get(s.id) is s
    assert reg.list() == [s]


def test_credentials_rendered_once_per_session() -> None:
    clock = Clock()
    reg = registry(clock, username="{user}-session-{session}-port-{port}")
    s = reg.current(10202)
    assert s.username == "alice-session-sess0001-port-10202"
    assert parse_basic_authorization(s.authorization) == (s.username, "s3cret")
    assert "s3cret" not in repr(s)


def test_fixed_expiry_then_rotation() -> None:
    """
    A session ends exactly its lifetime after creation, however busy it was;
    the next request then gets a new one.
    """
    clock = Clock()
    clock.advance(1000)
    reg = registry(clock, lifetime="90s")
    s = reg.current(10201)
    assert (s.created, s.expires) == (1000, 1090)
    clock.advance(89)
    assert reg.current(10201) is s
    clock.advance(1)
    assert s.ended is EndReason.EXPIRED and s.ended_at == 1090
    assert reg.peek(10201) is None
    assert reg.get(s.id) is None
    s2 = reg.current(10201)
    assert s2.id != s.id and s2.created == 1090


def test_ports_are_independent() -> None:
    clock = Clock()
    reg = registry(clock)
    a, b = reg.current(10201), reg.current(10202)
    assert a.id != b.id
    reg.reset(10201)
    assert reg.peek(10202) is b


def test_early_end_cancels_the_timer() -> None:
    clock = Clock()
    reg = registry(clock)
    s = reg.current(10201)
    assert len(clock.getDelayedCalls()) == 1
    reg.end(s.id, EndReason.CLOSED)
    assert clock.getDelayedCalls() == []
    assert reg.end(s.id, EndReason.CLOSED) is None


def test_reset_and_renew() -> None:
    clock = Clock()
    reg = registry(clock)
    recorder = Recorder()
    reg.subscribe(recorder)
    assert reg.reset(10201) is None
    s1 = reg.current(10201)
    assert reg.reset(10201) is s1 and s1.ended is EndReason.RESET
    assert reg.peek(10201) is None
    s2 = reg.renew(10201)
    assert reg.peek(10201) is s2
    s3 = reg.renew(10201)
    assert s2.ended is EndReason.RENEWED and reg.peek(10201) is s3
    assert recorder.events == [
        ("started", s1.id, None),
        ("ended", s1.id, EndReason.RESET),
        ("started", s2.id, None),
        ("ended", s2.id, EndReason.RENEWED),
        ("started", s3.id, None),
    ]
    assert len(clock.getDelayedCalls()) == 1


def test_ids_unique_among_live_sessions() -> None:
    """
    An id already in use is drawn again; when no fresh id can be found the
    registry says so instead of looping.
    """
    draws = iter(["AAAAAAAA", "AAAAAAAA", "BBBBBBBB"])
    clock = Clock()
    reg = registry(clock, new_id=lambda spec: next(draws))
    assert reg.current(10201).id == "AAAAAAAA"
    assert reg.current(10202).id == "BBBBBBBB"
    reg2 = registry(clock, new_id=lambda spec: "SAME0000")
    reg2.current(10201)
    with pytest.raises(IdSpaceExhausted):
        reg2.current(10202)


def test_secure_id_follows_spec() -> None:
    m = mapping(session_id={"alphabet": "0-9", "length": 12})
    ids = {secure_id(m.session_id) for _ in range(50)}
    assert all(len(i) == 12 and i.isdigit() for i in ids)
    assert len(ids) == 50


@pytest.mark.parametrize(
    "spec, drawn, not_drawn",
    [
        (SessionIdSpec("abc", 4), ["abca", "cccc"], ["abc", "abcab", "abcd", "ABCA", "", "ab\nc"]),
        (
            SessionIdSpec("0123456789", 1, (1000, 99999)),
            ["1000", "54321", "99999"],
            ["999", "100000", "01000", "+1000", "1_000", "\u0661\u0660\u0660\u0660", "9" * 5000],
        ),
    ],
)
def test_spelled_as_tells_what_secure_id_could_have_drawn(
    spec: SessionIdSpec, drawn: list[str], not_drawn: list[str]
) -> None:
    assert all(spelled_as(spec, secure_id(spec)) for _ in range(50))
    assert [i for i in drawn if spelled_as(spec, i)] == drawn
    assert [i for i in not_drawn if spelled_as(spec, i)] == []


def test_unknown_port() -> None:
    reg = registry(Clock())
    with pytest.raises(NoSuchPort):
        reg.current(1)
    with pytest.raises(NoSuchPort):
        reg.peek(1)


def test_observer_failure_is_logged_not_raised(logged_failures: Any) -> None:
    class Broken:
        def session_started(self, session: Session) -> None:
            raise ValueError("observer bug")

        def session_ended(self, session: Session, reason: EndReason) -> None:
            raise ValueError("observer bug")

    reg = registry(Clock())
    reg.subscribe(Broken())
    s = reg.current(10201)
    reg.end(s.id, EndReason.CLOSED)
    assert len(logged_failures.expect(ValueError)) == 2


def test_unsubscribe() -> None:
    reg = registry(Clock())
    recorder = Recorder()
    unsubscribe = reg.subscribe(recorder)
    unsubscribe()
    reg.current(10201)
    assert recorder.events == []


def test_stop_service_cancels_timers_and_start_reschedules() -> None:
    clock = Clock()
    reg = registry(clock, lifetime="60s")
    reg.startService()
    s = reg.current(10201)
    clock.advance(10)
    reg.stopService()
    assert clock.getDelayedCalls() == []
    reg.startService()
    clock.advance(49)
    assert s.live
    clock.advance(1)
    assert s.ended is EndReason.EXPIRED


class RegistryMachine(RuleBasedStateMachine):
    """
    Any sequence of requests, expiries, resets, renewals and ends keeps the
    registry consistent with a simple model.
    """

    LIFETIME = 100.0

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.reg = registry(self.clock, lifetime=self.LIFETIME, new_id=secure_id)
        self.recorder = Recorder()
        self.reg.subscribe(self.recorder)
        # model: port -> (id, expires)
        self.model: dict[int, tuple[str, float]] = {}
        self.ended: set[str] = set()

    def _expire_model(self) -> None:
        now = self.clock.seconds()
        for port, (sid, expires) in list(self.model.items()):
            if expires <= now:
                del self.model[port]
                self.ended.add(sid)

    @rule(port=st.sampled_from(PORTS))
    def request(self, port: int) -> None:
        s = self.reg.current(port)
        if port in self.model:
            assert s.id == self.model[port][0]
        else:
            assert s.id not in self.ended
            self.model[port] = (s.id, self.clock.seconds() + self.LIFETIME)

    @rule(seconds=st.floats(min_value=0, max_value=250))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self._expire_model()

    @rule(port=st.sampled_from(PORTS))
    def reset(self, port: int) -> None:
        ended = self.reg.reset(port)
        if port in self.model:
            assert ended is not None and ended.id == self.model[port][0]
            self.ended.add(ended.id)
            del self.model[port]
        else:
            assert ended is None

    @rule(port=st.sampled_from(PORTS))
    def renew(self, port: int) -> None:
        old = self.model.get(port)
        s = self.reg.renew(port)
        if old is not None:
            self.ended.add(old[0])
            assert s.id != old[0]
        self.model[port] = (s.id, self.clock.seconds() + self.LIFETIME)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), reason=st.sampled_from([EndReason.CLOSED, EndReason.RELEASED]))
    def end(self, data: st.DataObject, reason: EndReason) -> None:
        port = data.draw(st.sampled_from(sorted(self.model)))
        sid = self.model.pop(port)[0]
        assert self.reg.end(sid, reason) is not None
        self.ended.add(sid)

    @invariant()
    def matches_model(self) -> None:
        live = {s.port: (s.id, s.expires) for s in self.reg.list()}
        assert live == self.model
        # one pending expiry per live session, no more
        assert len(self.clock.getDelayedCalls()) == len(self.model)
        ids = [s.id for s in self.reg.list()]
        assert len(set(ids)) == len(ids)

    @invariant()
    def events_balance(self) -> None:
        started = sum(1 for kind, _, _ in self.recorder.events if kind == "started")
        ended = sum(1 for kind, _, _ in self.recorder.events if kind == "ended")
        assert started - ended == len(self.model)


TestRegistryMachine = RegistryMachine.TestCase
TestRegistryMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
