"""
Log lines that repeat, once per window.

Some failures are logged per request: a gateway that refuses connections,
credentials it rejects, a certificate that fails.  While the vendor is down
every request of every port says the same thing, thousands of lines a second
that would bury the rest of the log (journald drops lines past its own rate
limit, and a log file grows without bound).

:class:`Repeats` logs the first line of a kind at once and counts the lines
of that kind that follow within ``WINDOW`` seconds.  At the window's end, if
any came, one line says how many (``... (and 212 more like it in 10s)``) and
a new window starts; a window in which none came closes without a word, and
the next line of that kind is logged at once again.  What counts as one kind
is chosen by the caller (the upstream and what failed, not the session id or
the client), and the metrics still count every failure
(``proxymap_upstream_errors_total``).

Nothing here runs per byte, nor per request that goes well.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from twisted.logger import Logger, LogLevel

#: Seconds between two lines of one kind.
WINDOW = 10.0


class Repeats:
    """
    Lines of a kind logged at most once per window; see the module.
    """

    def __init__(self, clock: Any, window: float = WINDOW) -> None:
        self._clock = clock
        self.window = window
        #: Lines of each open window's kind left out so far.
        self._left_out: dict[Hashable, int] = {}

    def emit(
        self, log: Logger, level: LogLevel, kind: Hashable, format: str, /, **fields: Any
    ) -> None:
        """
        Log ``format`` with ``fields`` at ``level``, unless a line of
        ``kind`` was logged less than a window ago: then count it.  (The
        first four are positional only, so that any name can be a field.)
        """
        left_out = self._left_out.get(kind)
        if left_out is not None:
            self._left_out[kind] = left_out + 1
            return
        log.emit(level, format, **fields)
        self._open(log, level, kind, format, fields)

    def _open(
        self, log: Logger, level: LogLevel, kind: Hashable, format: str, fields: dict[str, Any]
    ) -> None:
        self._left_out[kind] = 0
        self._clock.callLater(self.window, self._close, log, level, kind, format, fields)

    def _close(
        self, log: Logger, level: LogLevel, kind: Hashable, format: str, fields: dict[str, Any]
    ) -> None:
        left_out = self._left_out.pop(kind)
        if left_out:
            log.emit(
                level,
                format + " (and {repeats} more like it in {window:g}s)",
                repeats=left_out,
                window=self.window,
                **fields,
            )
            self._open(log, level, kind, format, fields)
