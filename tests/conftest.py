"""
Shared fixtures.

Every test fails if it logged an unexpected failure (``log.failure`` or an
error-level event with a traceback): errors that Twisted catches and logs
would otherwise pass silently.

The commands tests run (``twist``, ``twistd``, ``schemathesis``) are the
ones installed beside the interpreter running the suite: the README runs it
as ``.venv/bin/python -m pytest``, with no venv activated, so its ``bin``
directory goes first on ``PATH`` here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import LogLevel, globalLogPublisher

os.environ["PATH"] = os.pathsep.join(
    [str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]
)


class LoggedFailures(list[dict[str, Any]]):
    """
    The failure events logged during a test; a test that provokes one on
    purpose removes it with :meth:`expect`.
    """

    def expect(self, exception_type: type[BaseException]) -> list[dict[str, Any]]:
        matching = [e for e in self if e["log_failure"].check(exception_type)]
        for event in matching:
            self.remove(event)
        return matching


@pytest.fixture(autouse=True)
def logged_failures() -> Iterator[LoggedFailures]:
    failures = LoggedFailures()

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event and event.get("log_level", LogLevel.error) >= LogLevel.error:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield failures
    finally:
        globalLogPublisher.removeObserver(observe)
    if failures:
        messages = [e["log_failure"].getTraceback() for e in failures]
        pytest.fail("unexpected failures were logged:\n" + "\n".join(messages))
