"""
Coarse timers shared by the client connections of every port of a service
(one ``Deadlines`` per ``Tally``).

Every client connection has one deadline at a time (its head, idle, response,
connect or tunnel timeout; see ``ProxyServer._deadline``).  A Twisted
``DelayedCall`` per connection costs about 400 bytes (the call, its bound
methods and its keyword dict) on every idle tunnel held, and a heap entry in
the reactor.  Deadlines are instead rounded up to a tick of 1/32 s and the
connections due in the same tick share one ``DelayedCall``: ~10,000 tunnels
opened over a few seconds need a few hundred calls, and each connection costs
a set entry and the number of its tick.

A timeout may therefore fire up to one tick (31 ms) late; never early.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

log = Logger()

#: Ticks per second.  A power of two, so whole and half seconds (and the
#: durations of the tests) land on a tick exactly.
TICKS = 32


class Watcher(Protocol):
    def deadline_passed(self) -> None:
        """
        The tick this watcher was added for has come.
        """


class Deadlines:
    """
    Watchers grouped by the tick they are due in, one reactor call per tick.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._due: dict[int, set[Watcher]] = {}
        self._calls: dict[int, IDelayedCall] = {}

    def add(self, watcher: Watcher, when: float) -> int:
        """
        Call ``watcher.deadline_passed()`` once, at the first tick at or after
        ``when``.  Returns the tick, which :meth:`discard` needs.
        """
        tick = tick_of(when)
        due = self._due.get(tick)
        if due is None:
            due = self._due[tick] = set()
            delay = max(tick / TICKS - self._reactor.seconds(), 0.0)
            self._calls[tick] = self._reactor.callLater(delay, self._fire, tick)
        due.add(watcher)
        return tick

    def discard(self, watcher: Watcher, tick: int) -> None:
        """
        Forget ``watcher`` in ``tick`` (nothing if it is not there).
        """
        due = self._due.get(tick)
        if due is None:
            return
        due.discard(watcher)
        if not due:
            del self._due[tick]
            self._calls.pop(tick).cancel()

    def __len__(self) -> int:
        """
        How many watchers are waiting.
        """
        return sum(map(len, self._due.values()))

    def _fire(self, tick: int) -> None:
        del self._calls[tick]
        for watcher in self._due.pop(tick):
            try:
                watcher.deadline_passed()
            except Exception:
                # One failing watcher must not starve the others of the tick.
                log.failure("a deadline handler failed")


def tick_of(when: float) -> int:
    """
    The first tick at or after ``when``.
    """
    tick = math.ceil(when * TICKS)
    if tick / TICKS < when:  # the product rounded down
        tick += 1
    return tick


def tick_time(tick: int) -> float:
    """
    When ``tick`` comes, in the reactor's seconds.
    """
    return tick / TICKS
