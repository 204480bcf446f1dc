"""
Sessions that survive restarts.

Live sessions (port, id, created, expires, parameters) are written to a JSON
file: atomically (write, fsync, rename), a moment after changes (debounced),
and at shutdown; one write at a time, and never older content over newer.
At start, each saved session whose mapping is unchanged (same fingerprint)
and which has not expired is restored, so a restart does not rotate every
worker's identity.  A missing, corrupt or unreadable file is logged and
ignored: proxymap starts fresh rather than not at all; so is an entry the
registry could not have made.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from proxymap.config import MappingConfig
from proxymap.sessions import EndReason, NoSuchPort, Session, SessionRegistry, spelled_as

log = Logger()

VERSION = 1
#: How long after a change the file is written (changes in between are merged).
DEBOUNCE = 1.0


def fingerprint(mapping: MappingConfig) -> str:
    """
    What a session's credentials depend on (never the password itself): a
    change to any of it means saved sessions of the mapping are not restored.
    """
    parts = {
        "upstream": [mapping.upstream.scheme, mapping.upstream.host, mapping.upstream.port],
        "user": mapping.user,
        "username": mapping.username.source,
        "password": mapping.password_template.source,
        "params": list(mapping.params),
        "session_params": [name for name, _ in mapping.session_params],
        "lifetime": mapping.lifetime,
        "preset": mapping.preset,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _time(value: object) -> float | None:
    """
    ``value`` as a time, if it is a finite number.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@attrs.define(eq=False)
class StateFile:
    """
    Saves the registry's live sessions to ``path`` and restores them.
    """

    path: Path
    registry: SessionRegistry
    clock: IReactorTime
    #: Runs the blocking write: in a thread in production, inline in tests.
    run_write: Callable[[Callable[[], None]], object] = attrs.field(default=lambda f: f())
    _pending: IDelayedCall | None = attrs.field(default=None, init=False)
    #: Held by a write from its temporary file to its rename: writes run in
    #: threads, and one at shutdown on the reactor's, all through one
    #: temporary file.
    _writing: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    #: The number of the newest content made, and of the newest on disk.
    _made: int = attrs.field(default=0, init=False)
    _written: int = attrs.field(default=0, init=False)
    writes: int = 0

    # ------------------------------------------------------------ restore

    def restore(self) -> int:
        """
        Restore the saved sessions that still apply; returns how many.
        """
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return 0
        except OSError as e:
            log.warn(
                "cannot read the state file {path} ({error}); starting fresh",
                path=str(self.path),
                error=e.strerror or str(e),
            )
            return 0
        try:
            data = json.loads(raw)
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}")
            entries = list(data["sessions"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warn(
                "the state file {path} is corrupt ({error}); starting fresh",
                path=str(self.path),
                error=str(e),
            )
            return 0
        now = self.clock.seconds()
        restored = 0
        for entry in entries:
            try:
                saved = self._saved(entry, now)
                if saved is None:
                    continue
                port, session_id, created, expires, params = saved
                self.registry.restore(port, session_id, created, expires, params)
                restored += 1
            except ValueError as e:
                log.warn("skipping a saved session ({error})", error=str(e))
        log.info("restored {count} sessions from {path}", count=restored, path=str(self.path))
        return restored

    def _saved(
        self, entry: object, now: float
    ) -> tuple[int, str, float, float, dict[str, str]] | None:
        """
        What ``entry`` restores, or ``None`` when its port is no longer
        mapped, its mapping changed, it expired or its port has a session
        already.

        The file is proxymap's own, but an entry is checked as if it were
        not: a restored session must be one the registry could have made
        (its id spelled as the mapping's ids are, its times finite and no
        longer apart than the lifetime), because its id goes into headers
        and credentials and its times into timers and dates.

        :raises ValueError: naming what is wrong with the entry.
        """
        if not isinstance(entry, dict):
            raise ValueError(f"not an object: {entry!r:.40}")
        port = entry.get("port")
        if type(port) is not int:
            raise ValueError(f"port {port!r:.40} is not a port number")
        try:
            mapping = self.registry.policy(port).mapping
        except NoSuchPort:
            return None  # no longer mapped
        if entry.get("fingerprint") != fingerprint(mapping):
            return None
        session_id = entry.get("id")
        if not isinstance(session_id, str) or not spelled_as(mapping.session_id, session_id):
            raise ValueError(
                f"port {port}: id {session_id!r:.40} is not spelled as"
                f" mapping {mapping.name!r} spells session ids"
            )
        created, expires = _time(entry.get("created")), _time(entry.get("expires"))
        if not (
            created is not None
            and expires is not None
            and created <= expires <= created + mapping.lifetime
            and expires <= now + mapping.lifetime
        ):
            raise ValueError(
                f"port {port}: created {entry.get('created')!r:.40} and expires"
                f" {entry.get('expires')!r:.40} are not times {mapping.lifetime:g} s apart at most"
            )
        if expires <= now or self.registry.peek(port) is not None:
            return None
        params = entry.get("params", {})
        if not isinstance(params, dict) or not all(
            isinstance(value, str) for value in params.values()
        ):
            raise ValueError(f"port {port}: params {params!r:.40} are not names and strings")
        return port, session_id, created, expires, params

    # ------------------------------------------------------------ save

    def session_started(self, session: Session) -> None:
        self._soon()

    def session_ended(self, session: Session, reason: EndReason) -> None:
        self._soon()

    def _soon(self) -> None:
        if self._pending is None:
            self._pending = self.clock.callLater(DEBOUNCE, self._save_later)

    def _save_later(self) -> None:
        self._pending = None
        made, content = self._content()
        self.run_write(lambda: self._write(made, content))

    def save_now(self) -> None:
        """
        Write at once (at shutdown), cancelling any pending write.
        """
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self._write(*self._content())

    def _content(self) -> tuple[int, str]:
        """
        The file's content now, numbered: a write never replaces newer
        content with older.
        """
        self._made += 1
        sessions = []
        prints: dict[str, str] = {}  # by mapping: one hash a mapping, not a session
        for session in self.registry.list():
            mapping = self.registry.policy(session.port).mapping
            if mapping.name not in prints:
                prints[mapping.name] = fingerprint(mapping)
            sessions.append(
                {
                    "port": session.port,
                    "mapping": session.mapping,
                    "id": session.id,
                    "created": session.created,
                    "expires": session.expires,
                    "params": session.params,
                    "fingerprint": prints[mapping.name],
                }
            )
        return self._made, json.dumps({"version": VERSION, "sessions": sessions}, indent=1)

    def _write(self, made: int, content: str) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with self._writing:
                if made < self._written:
                    return  # newer content is on disk already
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                self._written = made
                self.writes += 1
        except OSError as e:
            log.warn(
                "cannot write the state file {path} ({error})",
                path=str(self.path),
                error=e.strerror or str(e),
            )
