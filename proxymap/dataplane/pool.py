"""
Idle upstream connections, kept for the next client connection of the same
session.

A worker that sends one request per connection (``Connection: close``, or a
client that never reuses connections) would otherwise cost an upstream
connect, a vendor-side accept and two closes per request.  When a client
connection ends with its upstream connection idle and reusable, the client
leg *parks* it here under its target's key (the session: see
``UpstreamTarget``); the next request of that session on a new client
connection takes it back instead of connecting.

What keeps this safe:

- only requests that may be sent twice take a parked connection (idempotent
  methods without a body, ``Request.retryable``): a parked connection the
  vendor closed in the meantime is only found out by using it, and such a
  request is then sent again on a fresh connection (see
  ``ProxyServer.upstream_retry``);
- a parked connection that receives anything, or closes, leaves the pool;
- a session that ends (rotation, reset, release, removal of its port) takes
  its parked connections with it, so no request of a new session goes over a
  connection of an old one, and nothing of a released session stays open;
- parked connections are closed after ``idle_timeout`` and there are at most
  ``max_idle`` of them across every port (the oldest goes first); together
  with the client connections they stay within ``max_connections`` (a new
  client connection beyond it closes the oldest parked one), so they never
  take the file descriptors clients need; a draining or stopped service
  parks nothing and closes what is parked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall

from proxymap.config import Limits

if TYPE_CHECKING:
    from proxymap.dataplane.upstream import UpstreamProtocol
    from proxymap.sessions import EndReason, Session


class UpstreamPool:
    """
    The idle upstream connections of every port of a service (one per ``Tally``).
    """

    def __init__(self, clock: Any, limits: Limits | None = None) -> None:
        self._clock = clock
        limits = limits or Limits()
        #: At most this many parked connections (0: never park).
        self.max_idle = limits.max_idle_upstreams
        #: Seconds a parked connection waits for its next request.
        self.idle_timeout = limits.idle_upstream_timeout
        #: By key, most recently parked last.  The key is the session
        #: (see ``UpstreamTarget``), so a session's end finds its own
        #: without reading every parked connection ...
        self._by_key: dict[object, list[UpstreamProtocol]] = {}
        #: ... but over a SOCKS5 upstream, where a connection leads to one
        #: target, the key is the session and the target: these are the
        #: other keys a session parked under, some perhaps emptied since
        #: (kept until the session ends, not sought on the way in and out).
        self._other_keys: dict[Session, set[object]] = {}
        #: Every parked connection and when it expires, oldest first.
        self._expires: dict[UpstreamProtocol, float] = {}
        self._sweep: IDelayedCall | None = None
        #: Requests sent over a parked connection instead of a new one.
        self.reused = 0
        #: Requests sent again because a reused connection had closed.
        self.retried = 0
        #: Closed (the service stops): nothing is parked any more.
        self.closed = False

    def configure(self, limits: Limits) -> None:
        """
        Take new limits (a reload); what is parked beyond them goes, and
        what stays expires by the new timeout, counted from when it was
        parked.  (Kept by the old one, a connection parked before a
        lowered timeout would also hold back the sweep of those parked
        after it: the sweep reads expiries in parking order.)
        """
        self.max_idle = limits.max_idle_upstreams
        for _ in range(len(self._expires) - max(self.max_idle, 0)):
            self.evict()
        if limits.idle_upstream_timeout == self.idle_timeout:
            return
        self.idle_timeout = limits.idle_upstream_timeout
        for up in self._expires:
            self._expires[up] = up.parked_at + self.idle_timeout
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        if self._expires:
            self._expire()

    def __len__(self) -> int:
        return len(self._expires)

    def park(self, up: UpstreamProtocol) -> bool:
        """
        Keep ``up`` for a later request of its session; ``False`` if it
        cannot be kept (the caller then closes it).
        """
        if self.closed or self.max_idle <= 0 or not up.idle:
            return False
        session = up.target.session
        if session is not None and session.ended is not None:
            return False
        if len(self._expires) >= self.max_idle:
            self.evict()
        up.park(self)
        key = up.key
        self._by_key.setdefault(key, []).append(up)
        if key is not session and session is not None:
            self._other_keys.setdefault(session, set()).add(key)
        up.parked_at = now = self._clock.seconds()
        self._expires[up] = now + self.idle_timeout
        if self._sweep is None:
            self._sweep = self._clock.callLater(self.idle_timeout, self._expire)
        return True

    def take(self, key: object) -> UpstreamProtocol | None:
        """
        The most recently parked connection for ``key``, out of the pool.
        """
        stack = self._by_key.get(key)
        while stack:  # bounded: each turn takes one out
            up = stack.pop()
            if not stack:
                del self._by_key[key]
            del self._expires[up]
            if up.idle:
                self.reused += 1
                return up
            # Closing already (it sent something unasked): its close will
            # find it gone from the pool and tell nobody.
            up.close()
        return None

    def discard(self, up: UpstreamProtocol) -> None:
        """
        Forget ``up`` (it closed while parked).
        """
        if self._expires.pop(up, None) is None:
            return
        stack = self._by_key[up.key]
        stack.remove(up)
        if not stack:
            del self._by_key[up.key]

    def evict(self) -> None:
        """
        Close the connection parked longest ago, if any.
        """
        if self._expires:
            self._close(next(iter(self._expires)))

    def close_all(self) -> None:
        """
        Close every parked connection and park no more (the service stops).
        """
        self.closed = True
        for up in list(self._expires):
            self._close(up)
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        self._other_keys.clear()

    def _close(self, up: UpstreamProtocol) -> None:
        self.discard(up)
        up.close()

    def _expire(self) -> None:
        self._sweep = None
        now = self._clock.seconds()
        while self._expires:  # bounded: each turn removes one, or returns
            up, expires = next(iter(self._expires.items()))
            if expires > now:
                self._sweep = self._clock.callLater(expires - now, self._expire)
                return
            self._close(up)

    # SessionObserver: an ended session's connections are not reused.
    def session_started(self, session: Session) -> None:
        pass

    def session_ended(self, session: Session, reason: EndReason) -> None:
        for key in (session, *self._other_keys.pop(session, ())):
            for up in self._by_key.pop(key, ()):
                del self._expires[up]
                up.close()
