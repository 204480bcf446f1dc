"""
Upstream host names, looked up once and kept.

Vendors' gateways are names (``pr.oxylabs.io``, ``brd.superproxy.io``).
Given a name, Twisted's ``connectTCP`` looks it up on every connection: a
``gethostbyname`` in the reactor's thread pool, and a DNS query unless the
system caches, for every tunnel and for every request that finds no kept
connection.  Measured here with the gateway named ``localhost`` (answered
from /etc/hosts, no DNS at all), that alone cut CONNECT setups from 5.9k to
3.9k per second.

:class:`HostCache` looks a name up once and connects to the address it
got for :data:`TTL` seconds.  After that the address is still used while
a new lookup runs in the background (a gateway's address changes rarely,
and a lookup that fails or hangs must not stop traffic); only a name never
resolved makes connections wait, and concurrent connections share that
one lookup.  A name that fails with nothing known fails the connections
waiting for it, and for :data:`FAILED_TTL` seconds the next ones at once,
so a DNS outage does not queue a lookup per connection.  Literal addresses
skip all of this.

Lookups go through the reactor's resolver (``reactor.resolve``), as
Twisted's own ``connectTCP`` does, so the addresses are IPv4.  The same
cache answers for the targets a SOCKS5 upstream is given as addresses
(``socks_resolve = "local"``), and for the origins of the sandbox vendor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import DNSLookupError
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxymap.dataplane.socks import is_ip_address

log = Logger()

#: Seconds an address is used before it is looked up again.
TTL = 60.0
#: Seconds a name that failed to resolve fails new connections at once.
FAILED_TTL = 5.0


class _Name:
    __slots__ = ("address", "expires", "failure", "looking", "waiting")

    def __init__(self) -> None:
        #: The last address found (None: none yet).
        self.address: str | None = None
        #: When ``address`` is due to be looked up again, or, with no
        #: address, until when ``failure`` is the answer.
        self.expires = 0.0
        self.failure: Failure | None = None
        #: A lookup is running.
        self.looking = False
        #: Connections waiting for a first address.
        self.waiting: list[Deferred[str]] = []


class HostCache:
    """
    Addresses of upstream host names, shared by every port of a service.

    :param clock: ``seconds`` and ``callLater``.
    :param resolve: Looks a name up (``reactor.resolve`` by default).
    """

    #: At most this many names and literals are kept (the oldest go first).
    #: A mapping's gateway is one name; the sandbox vendor connects to the
    #: origins clients ask for, which are as many as they like.
    max_names = 1024

    def __init__(self, clock: Any, resolve: Callable[[str], Deferred[str]] | None = None) -> None:
        self._clock = clock
        self._resolve = resolve if resolve is not None else clock.resolve
        self._names: dict[str, _Name] = {}
        #: Lookups started (read by tests).
        self.lookups = 0

    def address(self, host: str) -> str | None:
        """
        The address to connect to for ``host`` now, without waiting: the
        literal itself, or the address kept for a name (looked up again in
        the background once due).  ``None``: call :meth:`lookup`.
        """
        name = self._names.get(host)
        if name is None:
            if not is_ip_address(host):
                return None
            name = self._new(host)
            name.address = host
            name.expires = math.inf
        elif name.address is not None and name.expires <= self._clock.seconds():
            self._start(host, name)
        return name.address

    def lookup(self, host: str) -> Deferred[str]:
        """
        The address of ``host``, a name :meth:`address` had none for.  Fails
        with :class:`DNSLookupError`.  Never answers synchronously.
        """
        name = self._names.get(host) or self._new(host)
        waiter: Deferred[str] = Deferred()
        if name.address is not None:  # found meanwhile
            self._clock.callLater(0, waiter.callback, name.address)
        elif name.failure is not None and name.expires > self._clock.seconds():
            self._clock.callLater(0, waiter.errback, name.failure)
        else:
            name.waiting.append(waiter)
            self._start(host, name)
        return waiter

    def _new(self, host: str) -> _Name:
        if len(self._names) >= self.max_names:
            for old, name in self._names.items():  # oldest first
                if not name.looking:  # (no connection waits for it)
                    del self._names[old]
                    break
        name = self._names[host] = _Name()
        return name

    def _start(self, host: str, name: _Name) -> None:
        if name.looking:
            return
        name.looking = True
        self.lookups += 1
        if _can_be_looked_up(host):
            d = self._resolve(host)
        else:
            d = fail(DNSLookupError(f"{host}: not a valid host name"))
        d.addCallbacks(
            self._found,
            self._failed,
            callbackArgs=(host, name),
            errbackArgs=(host, name),
        )

    def _found(self, address: str, host: str, name: _Name) -> None:
        # Only a change is news: the first address of each of the many
        # origins the sandbox or a SOCKS5 upstream resolves is not.
        if name.address is None:
            log.debug("host {host} is at {address}", host=host, address=address)
        elif address != name.address:
            log.info(
                "host {host} moved from {old} to {address}",
                host=host,
                old=name.address,
                address=address,
            )
        name.looking = False
        name.address = address
        name.failure = None
        name.expires = self._clock.seconds() + TTL
        waiting, name.waiting = name.waiting, []
        if waiting:
            self._clock.callLater(0, _answer, waiting, address)

    def _failed(self, failure: Failure, host: str, name: _Name) -> None:
        name.looking = False
        name.expires = self._clock.seconds() + FAILED_TTL
        if name.address is not None:
            # Keep what worked; look again after FAILED_TTL.
            log.warn(
                "cannot look up host {host} again ({error}); still using {address}",
                host=host,
                error=failure.getErrorMessage(),
                address=name.address,
            )
            return
        if not failure.check(DNSLookupError):
            failure = Failure(DNSLookupError(f"{host}: {failure.getErrorMessage()}"))
        name.failure = failure
        waiting, name.waiting = name.waiting, []
        if waiting:
            self._clock.callLater(0, _answer, waiting, failure)


def _can_be_looked_up(host: str) -> bool:
    """
    Whether ``host`` is a name DNS could hold: at most 253 characters, in
    labels of 1 to 63 (RFC 1035 2.3.4).  Python's resolver functions raise
    ``UnicodeError`` for any other, which Twisted's resolver does not catch:
    its lookup never answered, and the connection waited out its connect
    timeout.
    """
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(0 < len(label) <= 63 for label in name.split("."))


def _answer(waiting: list[Deferred[str]], result: str | Failure) -> None:
    """
    Tell every connection waiting for a name (on a later turn than the
    lookup's answer: a resolver may answer at once, and a connection must
    never hear of its failure inside its own ``connect``).
    """
    for waiter in waiting:
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)
