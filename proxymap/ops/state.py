"""
Sessions that survive restarts.

Live sessions (port, id, created, expires, parameters) are written to a JSON
file: atomically (write, fsync, rename), a moment after changes (debounced),
and at shutdown.  At start, each saved session whose mapping is unchanged
(same fingerprint) and which has not expired is restored, so a restart does
not rotate every worker's identity.  A missing, corrupt or unreadable file
is logged and ignored: proxymap starts fresh rather than not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from proxymap.config import MappingConfig
from proxymap.sessions import EndReason, Session, SessionRegistry

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
                port = int(entry["port"])
                policy = self.registry.policy(port)
                if entry["fingerprint"] != fingerprint(policy.mapping):
                    continue
                if float(entry["expires"]) <= now or self.registry.peek(port) is not None:
                    continue
                self.registry.restore(
                    port,
                    str(entry["id"]),
                    float(entry["created"]),
                    float(entry["expires"]),
                    {str(k): str(v) for k, v in dict(entry.get("params", {})).items()},
                )
                restored += 1
            except (KeyError, TypeError, ValueError) as e:
                log.warn("skipping a saved session ({error})", error=str(e))
        log.info("restored {count} sessions from {path}", count=restored, path=str(self.path))
        return restored

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
        content = self._content()
        self.run_write(lambda: self._write(content))

    def save_now(self) -> None:
        """
        Write at once (at shutdown), cancelling any pending write.
        """
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self._write(self._content())

    def _content(self) -> str:
        sessions = []
        for session in self.registry.list():
            mapping = self.registry.policy(session.port).mapping
            sessions.append(
                {
                    "port": session.port,
                    "mapping": session.mapping,
                    "id": session.id,
                    "created": session.created,
                    "expires": session.expires,
                    "params": session.params,
                    "fingerprint": fingerprint(mapping),
                }
            )
        return json.dumps({"version": VERSION, "sessions": sessions}, indent=1)

    def _write(self, content: str) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self.writes += 1
        except OSError as e:
            log.warn(
                "cannot write the state file {path} ({error})",
                path=str(self.path),
                error=e.strerror or str(e),
            )
