"""
The coarse shared timers of the data plane (proxymap/dataplane/deadlines.py),
on a Clock.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from proxymap.config import Limits
from proxymap.dataplane.deadlines import TICKS, Deadlines

from .helpers import Harness

TICK = 1 / TICKS


class Recorder:
    def __init__(self, clock: Clock, log: list[tuple[Recorder, float]]) -> None:
        self.clock = clock
        self.log = log

    def deadline_passed(self) -> None:
        self.log.append((self, self.clock.seconds()))


def test_watchers_due_in_one_tick_share_one_call() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    log: list[tuple[Recorder, float]] = []
    watchers = [Recorder(clock, log) for _ in range(100)]
    for i, w in enumerate(watchers):
        deadlines.add(w, 10.001 + i * TICK / 200)
    assert len(clock.getDelayedCalls()) == 1
    assert len(deadlines) == 100
    clock.advance(10 + TICK - 0.0001)
    assert log == []
    clock.advance(0.0001)
    assert sorted(id(w) for w, _ in log) == sorted(map(id, watchers))
    assert clock.getDelayedCalls() == []
    assert len(deadlines) == 0


def test_a_deadline_on_a_tick_fires_on_it() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    log: list[tuple[Recorder, float]] = []
    deadlines.add(Recorder(clock, log), 30.0)
    clock.advance(29.999)
    assert log == []
    clock.advance(0.001)
    assert [t for _, t in log] == [30.0]


def test_discarding_the_last_watcher_cancels_the_call() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    log: list[tuple[Recorder, float]] = []
    a, b = Recorder(clock, log), Recorder(clock, log)
    tick = deadlines.add(a, 5)
    assert deadlines.add(b, 5) == tick
    deadlines.discard(a, tick)
    assert len(clock.getDelayedCalls()) == 1
    deadlines.discard(b, tick)
    deadlines.discard(b, tick)  # twice: nothing
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert log == []


def test_a_failing_watcher_does_not_starve_the_others(logged_failures: Any) -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    log: list[tuple[Recorder, float]] = []

    class Broken:
        def deadline_passed(self) -> None:
            raise RuntimeError("boom")

    deadlines.add(Broken(), 1)
    deadlines.add(Recorder(clock, log), 1)
    clock.advance(1)
    assert len(log) == 1
    (event,) = logged_failures.expect(RuntimeError)
    assert event["log_format"] == "a deadline handler failed"


def test_a_watcher_may_add_itself_again_when_called() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    times: list[float] = []

    class Again:
        def deadline_passed(self) -> None:
            times.append(clock.seconds())
            if len(times) < 3:
                deadlines.add(self, clock.seconds() + 2)

    deadlines.add(Again(), 1)
    clock.advance(1)
    clock.advance(2)
    clock.advance(2)
    clock.advance(2)
    assert times == [1, 3, 5]
    assert clock.getDelayedCalls() == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "discard", "advance"]),
            st.integers(0, 7),
            st.floats(0, 5, allow_nan=False),
        ),
        max_size=60,
    )
)
def test_every_watcher_fires_once_within_a_tick_unless_discarded(
    steps: list[tuple[str, int, float]],
) -> None:
    """
    Whatever the order of adds, discards and clock moves: a watcher fires
    once, never before its deadline nor a tick or more after it, and none
    fires once discarded; no call is left when nothing waits.
    """
    clock = Clock()
    deadlines = Deadlines(clock)
    log: list[tuple[Recorder, float]] = []
    watchers = [Recorder(clock, log) for _ in range(8)]
    waiting: dict[int, tuple[float, int]] = {}  # index -> (deadline, tick)
    for action, i, x in steps:
        w = watchers[i]
        if action == "add" and i not in waiting:
            when = clock.seconds() + x
            waiting[i] = (when, deadlines.add(w, when))
        elif action == "discard" and i in waiting:
            deadlines.discard(w, waiting.pop(i)[1])
        elif action == "advance":
            clock.advance(x)
        for fired, at in log:
            j = watchers.index(fired)
            assert j in waiting, "fired after it was discarded, or twice"
            when, tick = waiting.pop(j)
            assert when <= tick / TICKS <= when + TICK
            assert at >= when
        log.clear()
        if action == "advance":
            # Whoever still waits is due in a tick still to come.
            assert all(tick / TICKS > clock.seconds() for _, tick in waiting.values())
        assert len(deadlines) == len(waiting)
    if not waiting:
        assert clock.getDelayedCalls() == []


def test_connections_opened_together_share_a_call() -> None:
    """
    Hundreds of connections that arrive in the same tick cost the reactor
    one DelayedCall for their timeouts, not one each; each closes at its
    own deadline still.
    """
    h = Harness(Limits(head_timeout=30))
    # Spread over the mapping's three ports: the ports of a tally share ticks.
    clients = [h.client(10201 + i % 3) for i in range(300)]
    assert len({id(f.deadlines) for f in h.factories.values()}) == 1
    assert len(h.factory.deadlines) == 300
    own = [c for c in h.reactor.getDelayedCalls() if c.func == h.factory.deadlines._fire]
    assert len(own) == 1
    h.reactor.advance(29.9)
    assert not any(t.disconnecting for _, t in clients)
    h.reactor.advance(0.1)
    assert all(t.disconnecting for _, t in clients)
    for proto, _transport in clients:
        proto.connectionLost()
    assert len(h.factory.deadlines) == 0
    assert [c for c in h.reactor.getDelayedCalls() if c.func == h.factory.deadlines._fire] == []
