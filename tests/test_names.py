"""
Upstream host names looked up once and kept (dataplane/names.py): a Clock and
a resolver the test answers by hand.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.error import DNSLookupError, TimeoutError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

from proxymap.dataplane.names import FAILED_TTL, TTL, HostCache

HOST = "gw.example.com"


class Resolver:
    """
    Records each lookup; the test answers it.
    """

    def __init__(self) -> None:
        self.asked: list[tuple[str, Deferred[str]]] = []

    def __call__(self, host: str) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.asked.append((host, d))
        return d

    def answer(self, result: str | Exception) -> None:
        _, d = self.asked[-1]
        if isinstance(result, Exception):
            d.errback(Failure(result))
        else:
            d.callback(result)


def outcome(d: Deferred[str]) -> list[Any]:
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def cache() -> tuple[HostCache, Clock, Resolver]:
    clock, resolver = Clock(), Resolver()
    return HostCache(clock, resolve=resolver), clock, resolver


def known() -> tuple[HostCache, Clock, Resolver]:
    """
    A cache that has just found HOST at 192.0.2.10.
    """
    names, clock, resolver = cache()
    names.lookup(HOST)
    resolver.answer("192.0.2.10")
    return names, clock, resolver


def test_a_literal_is_its_own_address() -> None:
    names, _, resolver = cache()
    assert names.address("192.0.2.7") == "192.0.2.7"
    assert names.address("2001:db8::1") == "2001:db8::1"
    assert resolver.asked == []


def test_a_new_name_is_looked_up_once_for_everyone_waiting() -> None:
    names, clock, resolver = cache()
    assert names.address(HOST) is None
    first, second = outcome(names.lookup(HOST)), outcome(names.lookup(HOST))
    assert [host for host, _ in resolver.asked] == [HOST]
    resolver.answer("192.0.2.10")
    # Answered on a later turn, never inside the caller's own connect.
    assert first == second == []
    clock.advance(0)
    assert first == second == ["192.0.2.10"]
    assert names.address(HOST) == "192.0.2.10"
    assert names.lookups == 1


def test_an_address_is_used_without_lookups_until_due() -> None:
    names, clock, resolver = known()
    clock.advance(TTL - 1)
    for _ in range(3):
        assert names.address(HOST) == "192.0.2.10"
    assert len(resolver.asked) == 1


def test_a_due_address_is_still_used_while_looked_up_again() -> None:
    names, clock, resolver = known()
    clock.advance(TTL)
    assert names.address(HOST) == "192.0.2.10"
    assert names.address(HOST) == "192.0.2.10"
    assert len(resolver.asked) == 2  # one lookup in the background, not one per connection
    resolver.answer("192.0.2.11")
    assert names.address(HOST) == "192.0.2.11"
    clock.advance(TTL - 1)
    assert names.address(HOST) == "192.0.2.11"
    assert len(resolver.asked) == 2


def test_a_failed_refresh_keeps_the_address_and_tries_again_later() -> None:
    names, clock, resolver = known()
    clock.advance(TTL)
    names.address(HOST)
    resolver.answer(DNSLookupError(HOST))
    assert names.address(HOST) == "192.0.2.10"
    assert len(resolver.asked) == 2
    clock.advance(FAILED_TTL)
    assert names.address(HOST) == "192.0.2.10"
    assert len(resolver.asked) == 3


def test_a_name_that_never_resolved_fails_its_waiters_then_fails_fast() -> None:
    names, clock, resolver = cache()
    waiting = outcome(names.lookup(HOST))
    resolver.answer(DNSLookupError(HOST))
    assert waiting == []
    clock.advance(0)
    [failure] = waiting
    assert failure.check(DNSLookupError)
    # For a while new connections fail at once (on the next turn), without a lookup.
    again = outcome(names.lookup(HOST))
    clock.advance(0)
    assert again[0].check(DNSLookupError)
    assert len(resolver.asked) == 1
    # Then the name is looked up again, and may resolve now.
    clock.advance(FAILED_TTL)
    later = outcome(names.lookup(HOST))
    assert len(resolver.asked) == 2
    resolver.answer("192.0.2.10")
    clock.advance(0)
    assert later == ["192.0.2.10"]


@pytest.mark.parametrize(
    "host", ["a" * 64 + ".example", "a..example", ".example", "a." * 127 + "example"]
)
def test_a_name_dns_cannot_hold_fails_without_a_lookup(host: str) -> None:
    """
    A label over 63 characters, an empty label or a name over 253
    characters fails as a lookup does, without asking the resolver.
    """
    names, clock, resolver = cache()
    waiting = outcome(names.lookup(host))
    clock.advance(0)
    [failure] = waiting
    assert failure.check(DNSLookupError)
    assert "not a valid host name" in failure.getErrorMessage()
    assert resolver.asked == []


@pytest_twisted.ensureDeferred
async def test_the_reactors_resolver_is_spared_a_name_it_cannot_encode() -> None:
    """
    Given such a name, Python's resolver functions raise UnicodeError and
    Twisted's resolver never answers; with the reactor's own resolver the
    lookup fails at once instead.
    """
    from twisted.internet import reactor

    names = HostCache(reactor)
    lookup = names.lookup("a" * 64 + ".example").addTimeout(5, reactor)
    with pytest.raises(DNSLookupError):
        await lookup


def test_a_name_at_dns_limits_is_looked_up() -> None:
    names, _, resolver = cache()
    host = ("a" * 63 + ".") * 3 + "b" * 61 + "."  # 253 characters and the root's dot
    names.lookup(host)
    assert [asked for asked, _ in resolver.asked] == [host]


@pytest.mark.parametrize("error", [TimeoutError(), OSError("resolver broke")])
def test_any_lookup_failure_is_a_dns_lookup_error_naming_the_host(error: Exception) -> None:
    names, clock, resolver = cache()
    waiting = outcome(names.lookup(HOST))
    resolver.answer(error)
    clock.advance(0)
    [failure] = waiting
    assert failure.check(DNSLookupError)
    assert HOST in failure.getErrorMessage()


def test_a_lookup_after_the_answer_gets_it_on_the_next_turn() -> None:
    names, clock, resolver = known()
    late = outcome(names.lookup(HOST))
    assert late == []
    clock.advance(0)
    assert late == ["192.0.2.10"]
    assert len(resolver.asked) == 1


def test_at_most_max_names_are_kept_the_oldest_go_first() -> None:
    names, clock, resolver = cache()
    names.max_names = 2
    for i, host in enumerate(["a.example", "b.example", "c.example"]):
        names.lookup(host)
        resolver.answer(f"192.0.2.{i}")
    assert names.address("a.example") is None
    assert names.address("b.example") == "192.0.2.1"
    assert names.address("c.example") == "192.0.2.2"

    # A name still being looked up is never the one to go.
    names, clock, resolver = cache()
    names.max_names = 2
    names.lookup("d.example")
    [(_, d_lookup)] = resolver.asked
    names.lookup("x.example")
    resolver.answer("192.0.2.9")
    names.lookup("e.example")  # the oldest, d, is being looked up: x goes
    d_lookup.callback("192.0.2.4")
    resolver.answer("192.0.2.5")
    assert names.address("d.example") == "192.0.2.4"
    assert names.address("e.example") == "192.0.2.5"
    assert names.address("x.example") is None
    clock.advance(0)


def test_only_an_address_that_changes_is_logged_as_news() -> None:
    """
    A first address is logged at debug level (origins come by the
    thousand); a refresh that finds another address is logged at info,
    naming both.
    """
    with capturedLogs() as events:
        names, clock, resolver = known()
        clock.advance(TTL)
        names.address(HOST)
        resolver.answer("192.0.2.10")
        clock.advance(TTL)
        names.address(HOST)
        resolver.answer("192.0.2.11")
    news = [e for e in events if e["log_level"] >= LogLevel.info]
    assert [(e["old"], e["address"]) for e in news] == [("192.0.2.10", "192.0.2.11")]
    assert names.address(HOST) == "192.0.2.11"
