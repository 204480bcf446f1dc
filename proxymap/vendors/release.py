"""
Vendor-side release: when a session ends early, tell the vendor, so its
sticky exit is freed at once instead of lingering until the vendor's own
timer runs out.

A mapping's ``[mapping.release]`` table describes the call (method, URL,
API credentials, a JSON body template); the geonode preset fills in Geonode's
release API.  :class:`VendorRelease` watches the registry: session ends whose
reason is in ``on`` (by default reset, renewed, closed, released and stopped,
never natural expiry) are batched for a moment, sent with treq without ever
blocking traffic, retried with backoff on errors and timeouts, then counted
and logged (without credentials) if they still fail.  A stop sends what is
queued and waits for the calls, up to the service's grace.

Body templates are JSON with ``{placeholders}``, each replaced by the JSON
value of the field (numbers stay numbers): ``{"port": {upstream_port},
"sessionId": {session}}``.  ``{entries}`` in the body is the JSON array of one
rendered ``entry`` per released session.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

from proxymap.config import ConfigError, Secret, parse_duration, resolve_secret
from proxymap.sessions import EndReason, Session

log = Logger()

_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
DEFAULT_ON = frozenset(
    {
        EndReason.RESET,
        EndReason.RENEWED,
        EndReason.CLOSED,
        EndReason.RELEASED,
        EndReason.STOPPED,
    }
)

#: The geonode preset's release API.
GEONODE = {
    "method": "PUT",
    "url": "https://monitor.geonode.com/sessions/release/{service_type}",
    "body": '{"data": {entries}}',
    "entry": '{"port": {upstream_port}, "sessionId": {session}}',
}
PRESETS = {"geonode": GEONODE}

#: The client errors worth another attempt: a timeout, too early, too many
#: requests.  Any other 4xx answer ends the call (a retry would be as wrong).
_RETRIED_4XX = frozenset({408, 425, 429})

#: Calls of one mapping under way at once; the others wait their turn.  A
#: release of every port at a vendor whose API takes one session a call
#: would otherwise open a connection per port at once, beyond the
#: descriptors the open-file limit keeps aside (``ops/openfiles.py``).
MAX_CALLS = 4


@attrs.frozen
class ReleaseConfig:
    """
    How to release a mapping's sessions at the vendor.
    """

    method: str
    url: str
    user: str
    password: Secret
    body: str
    entry: str
    on: frozenset[EndReason] = DEFAULT_ON
    timeout: float = 10.0
    retries: int = 3
    backoff: float = 1.0
    batch: float = 0.2

    @property
    def batches(self) -> bool:
        """
        Several sessions go in one call when the body lists ``{entries}``
        and the URL names no single session.
        """
        return "{entries}" in self.body and "{session}" not in self.url


def render_json(template: str, values: Mapping[str, Any]) -> str:
    """
    Replace each ``{name}`` by the JSON of ``values[name]``.
    """
    return _PLACEHOLDER.sub(lambda m: json.dumps(values[m.group(1)]), template)


def render_url(template: str, values: Mapping[str, Any]) -> str:
    return _PLACEHOLDER.sub(lambda m: quote(str(values[m.group(1)]), safe=""), template)


def session_values(
    session: Session, upstream_host: str, upstream_port: int, params: Mapping[str, str]
) -> dict[str, Any]:
    """
    What release templates may use for one session.
    """
    return {
        **params,
        **session.params,
        "session": session.id,
        "port": session.port,
        "username": session.username,
        "upstream_host": upstream_host,
        "upstream_port": upstream_port,
    }


def parse_release(
    raw: object,
    key: str,
    preset: str | None,
    params: Mapping[str, str],
    session_params: Mapping[str, str],
    env: Mapping[str, str],
) -> ReleaseConfig:
    """
    Validate a ``[mapping.release]`` table; a preset supplies the defaults.
    """
    from proxymap.config import _Table

    table = _Table(raw, key)
    defaults = PRESETS.get(preset or "", {})
    method = table.pop_typed("method", str, defaults.get("method", "PUT")).upper()
    if method not in ("PUT", "POST", "DELETE", "PATCH", "GET"):
        raise ConfigError(table.name("method"), f"unsupported method {method!r}")
    url = table.pop_typed("url", str, defaults.get("url", ""))
    if not re.match(r"https?://", url):
        raise ConfigError(table.name("url"), "expected an http:// or https:// URL")
    body = table.pop_typed("body", str, defaults.get("body", ""))
    entry = table.pop_typed("entry", str, defaults.get("entry", ""))
    user = table.pop_typed("user", str, "")
    password = resolve_secret(table.pop("pass", ""), table.name("pass"), env)
    if not user or not password.value:
        raise ConfigError(table.name("user"), "the release API needs its own user and pass")
    on_names = table.pop("on", sorted(r.value for r in DEFAULT_ON))
    reasons = {r.value: r for r in EndReason}
    if not isinstance(on_names, list) or not all(
        isinstance(n, str) and n in reasons for n in on_names
    ):
        raise ConfigError(table.name("on"), f"expected a list of: {', '.join(sorted(reasons))}")
    timeout = parse_duration(table.pop("timeout", 10), table.name("timeout"))
    backoff = parse_duration(table.pop("backoff", 1), table.name("backoff"))
    batch = parse_duration(table.pop("batch", 0.2), table.name("batch"))
    retries = table.pop_typed("retries", int, 3)
    if not 0 <= retries <= 10:
        raise ConfigError(table.name("retries"), "must be between 0 and 10")
    table.finish()

    sample = {
        **{name: "x" for name in params},
        **{name: "x" for name in session_params},
        "session": "abc",
        "port": 1,
        "username": "u",
        "upstream_host": "h",
        "upstream_port": 2,
    }
    for field, template in (("url", url), ("body", body), ("entry", entry)):
        for name in _PLACEHOLDER.findall(template):
            if name not in sample and not (field == "body" and name == "entries"):
                raise ConfigError(
                    table.name(field),
                    f"unknown placeholder {{{name}}} (known: "
                    + ", ".join("{" + k + "}" for k in sorted(sample))
                    + ", {entries} in body)",
                )
    if body:
        try:
            one = json.loads(render_json(entry, sample)) if entry else None
        except ValueError as e:
            raise ConfigError(table.name("entry"), f"does not render to JSON: {e}") from None
        try:
            json.loads(render_json(body, {**sample, "entries": [one]}))
        except ValueError as e:
            raise ConfigError(table.name("body"), f"does not render to JSON: {e}") from None
    return ReleaseConfig(
        method=method,
        url=url,
        user=user,
        password=password,
        body=body,
        entry=entry,
        on=frozenset(reasons[n] for n in on_names),
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        batch=batch,
    )


class _QuietClientFactory(_HTTP11ClientFactory):
    """
    Twisted's HTTP client factory, without its "Starting factory
    _HTTP11ClientFactory(<function ... at 0x7f...>, ...)" and "Stopping
    factory" lines: two a release call, saying nothing the call's own line
    does not (twisted/twisted#9330).
    """

    noisy = False


def release_client(reactor: Any) -> HTTPClient:
    """
    The treq client release calls go out with: one connection a call, as
    calls are rare, and no log lines but proxymap's own.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = _QuietClientFactory  # the class the pool builds connections with
    return HTTPClient(Agent(reactor, pool=pool))


@attrs.define(eq=False)
class VendorRelease:
    """
    Releases one mapping's ended sessions at its vendor.
    """

    clock: IReactorTime
    client: Any  # treq.client.HTTPClient, or treq.testing.StubTreq in tests
    mapping: str
    config: ReleaseConfig
    upstream: tuple[str, int]
    params: Mapping[str, str] = attrs.field(factory=dict)
    #: Calls that succeeded / failed for good; attempts that were retried.
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    _queue: list[dict[str, Any]] = attrs.field(factory=list, init=False)
    _flush: IDelayedCall | None = attrs.field(default=None, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    #: Sessions whose calls stop() cancelled, for its one warning.
    _abandoned: list[str] = attrs.field(factory=list, init=False)
    #: Calls under way or waiting their turn (tests and shutdown wait on these).
    pending: list[Deferred[None]] = attrs.field(factory=list, init=False)
    _turns: DeferredSemaphore = attrs.field(
        factory=lambda: DeferredSemaphore(MAX_CALLS), init=False
    )

    # SessionObserver
    def session_started(self, session: Session) -> None:
        pass

    def session_ended(self, session: Session, reason: EndReason) -> None:
        if session.mapping != self.mapping or reason not in self.config.on:
            return
        values = session_values(session, *self.upstream, self.params)
        if not self.config.batches:
            self._start([values])
            return
        self._queue.append(values)
        if self._flush is None:
            self._flush = self.clock.callLater(self.config.batch, self._send_queue)

    def _send_queue(self) -> None:
        self._flush = None
        batch, self._queue = self._queue, []
        if batch:
            self._start(batch)

    def flush(self) -> None:
        """
        Send what is queued now, without waiting for the batch to fill.
        """
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._send_queue()

    def configure(
        self, config: ReleaseConfig, upstream: tuple[str, int], params: Mapping[str, str]
    ) -> None:
        """
        Take new settings (a reload): what is queued goes now, under the
        settings it was queued with, and calls under way finish under
        theirs (their retries too: a call never takes one vendor's
        credentials to another's URL).  Later ends go by the new ones.
        """
        self.flush()
        self.config = config
        self.upstream = upstream
        self.params = params

    def _start(self, batch: list[dict[str, Any]]) -> None:
        d = Deferred.fromCoroutine(self._send(batch))
        self.pending.append(d)

        def done(result: object) -> None:
            self.pending.remove(d)
            if not isinstance(result, Failure):
                return
            if self._stopping:  # cancelled at shutdown, still unanswered: stop() says so
                self._abandoned.extend(values["session"] for values in batch)
            else:
                log.failure("vendor release of {mapping} failed", result, mapping=self.mapping)

        d.addBoth(done)

    def _request(self, batch: list[dict[str, Any]]) -> tuple[str, bytes | None]:
        config = self.config
        url = render_url(config.url, batch[0])
        if not config.body:
            return url, None
        entries = [json.loads(render_json(config.entry, values)) for values in batch]
        body = render_json(config.body, {**batch[0], "entries": entries})
        return url, body.encode()

    async def _send(self, batch: list[dict[str, Any]]) -> None:
        config = self.config
        url, body = self._request(batch)
        ids = [values["session"] for values in batch]
        problem = ""
        for attempt in range(config.retries + 1):
            if attempt:
                self.retried += 1
                await deferLater(self.clock, config.backoff * 2 ** (attempt - 1))
            try:
                response, content = await self._call(config, url, body)
            except Exception as e:  # timeouts, refused connections, resets
                if self._stopping:
                    raise
                problem = type(e).__name__
                continue
            if 200 <= response.code < 300 and _says_success(content):
                self.succeeded += 1
                log.info(
                    "released sessions {ids} of {mapping} at the vendor",
                    ids=ids,
                    mapping=self.mapping,
                )
                return
            problem = f"HTTP {response.code}"
            if 400 <= response.code < 500 and response.code not in _RETRIED_4XX:
                break  # the call itself is wrong (credentials, URL, body): so is a retry
        self.failed += 1
        log.warn(
            "vendor release of sessions {ids} of {mapping} failed after {attempts} "
            "{tries} ({problem})",
            ids=ids,
            mapping=self.mapping,
            attempts=attempt + 1,
            tries="attempt" if attempt == 0 else "attempts",
            problem=problem,
        )

    async def _call(self, config: ReleaseConfig, url: str, body: bytes | None) -> tuple[Any, bytes]:
        """
        One attempt under ``config``, in its turn (at most
        :data:`MAX_CALLS` at once): the answer and its body.
        """
        await self._turns.acquire()
        try:
            if self._stopping:  # a turn freed by a call cancelled at shutdown
                raise CancelledError()
            response = await self.client.request(
                config.method,
                url,
                data=body,
                headers={"Content-Type": ["application/json"]} if body else None,
                auth=(config.user, config.password.value),
                reactor=self.clock,
                timeout=config.timeout,
            )
            return response, await response.content()
        finally:
            self._turns.release()

    def stop(self) -> None:
        """
        Stop at shutdown: nothing queued is sent, and calls under way (or
        waiting their turn) are cancelled; one warning names their
        sessions.  The service flushes the queue and waits for the calls
        first (:meth:`proxymap.tap.ProxymapService.stopService`).
        """
        self._stopping = True
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        for d in list(self.pending):
            d.cancel()  # its callback, done, runs now
        if self._abandoned:
            log.warn(
                "vendor release of sessions {ids} of {mapping} abandoned at the stop",
                ids=self._abandoned,
                mapping=self.mapping,
            )
            self._abandoned = []


def _says_success(content: bytes) -> bool:
    """
    A 2xx answer succeeded unless it is JSON saying ``"success": false``.
    """
    try:
        answer = json.loads(content)
    except ValueError:
        return True
    return not (isinstance(answer, dict) and answer.get("success") is False)
