"""
Log lines that repeat are logged once per window, then counted.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogEvent, Logger, LogLevel, capturedLogs, formatEvent

from proxymap.dataplane.repeats import WINDOW, Repeats

from .helpers import Harness

GET = b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"


def said(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events]


def test_the_first_line_of_a_kind_is_logged_at_once_and_the_rest_counted() -> None:
    clock, log = Clock(), Logger()
    repeats = Repeats(clock)
    with capturedLogs() as events:
        for n in range(5):
            repeats.emit(log, LogLevel.warn, "down", "gateway down ({n})", n=n)
        assert said(events) == ["gateway down (0)"]
        assert events[0]["log_level"] == LogLevel.warn
        clock.advance(WINDOW - 0.1)
        assert len(events) == 1
        clock.advance(0.1)
        assert said(events)[1:] == ["gateway down (0) (and 4 more like it in 10s)"]
        assert events[1]["log_level"] == LogLevel.warn


def test_a_flood_gives_one_line_a_window() -> None:
    clock, log = Clock(), Logger()
    repeats = Repeats(clock)
    with capturedLogs() as events:
        for _ in range(30):  # 3 windows, 10 lines each
            for _ in range(10):
                repeats.emit(log, LogLevel.info, "down", "gateway down")
            clock.advance(1)
        clock.advance(WINDOW)
    assert said(events) == [
        "gateway down",
        "gateway down (and 99 more like it in 10s)",
        "gateway down (and 100 more like it in 10s)",
        "gateway down (and 100 more like it in 10s)",
    ]


def test_a_quiet_window_closes_without_a_word() -> None:
    clock, log = Clock(), Logger()
    repeats = Repeats(clock)
    with capturedLogs() as events:
        repeats.emit(log, LogLevel.info, "down", "gateway down")
        clock.advance(WINDOW)
        assert clock.getDelayedCalls() == []
        repeats.emit(log, LogLevel.info, "down", "gateway down")
    assert said(events) == ["gateway down", "gateway down"]


def test_kinds_are_counted_apart() -> None:
    clock, log = Clock(), Logger()
    repeats = Repeats(clock)
    with capturedLogs() as events:
        for kind in ("a", "b", "a", "b", "a"):
            repeats.emit(log, LogLevel.info, kind, "{kind} failed", kind=kind)
        clock.advance(WINDOW)
    assert said(events) == [
        "a failed",
        "b failed",
        "a failed (and 2 more like it in 10s)",
        "b failed (and 1 more like it in 10s)",
    ]


def test_a_gateway_down_is_one_line_across_every_port() -> None:
    """
    Every request to a gateway that refuses connections still gets its 502,
    but the log says so once per window, for all the ports together.
    """
    h = Harness()
    with capturedLogs() as events:
        for port in list(h.factories) * 10:
            proto, client = h.client(port)
            proto.dataReceived(GET)
            h.fail_connect(ConnectionRefusedError())
            assert client.value().startswith(b"HTTP/1.1 502 ")
        h.reactor.advance(WINDOW)
    lines = [line for line in said(events) if "cannot connect" in line]
    first = "cannot connect to the upstream gw.example.com:10000: Connection was refused"
    count = 10 * len(h.factories)
    assert len(lines) == 2
    assert lines[0].startswith(first)
    assert lines[1].startswith(first) and lines[1].endswith(
        f"(and {count - 1} more like it in 10s)"
    )
