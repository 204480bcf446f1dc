"""
The client scripts in examples/, run as a user runs them, against proxymap
and the sandbox vendor.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue

from .conftest import start_stack

pytestmark = pytest.mark.integration

WORKER = Path(__file__).parents[2] / "examples" / "worker.py"


async def worker(*args: str) -> tuple[int, str, str]:
    out, err, code = await getProcessOutputAndValue(
        sys.executable, (str(WORKER), *args), env=dict(os.environ)
    )
    return code, out.decode(), err.decode()


@pytest.mark.parametrize(
    "url", [["--url", "http://ip.sandbox/json"], ["--url", "https://ip.sandbox/json", "--insecure"]]
)
@pytest_twisted.ensureDeferred
async def test_worker_sees_its_exit_change_with_each_new_session(url: list[str]) -> None:
    stack = start_stack(1, session_api={"enabled": True, "domain": "portmapper"})
    try:
        proxy = f"http://127.0.0.1:{stack.ports[0]}"
        code, out, err = await worker("--proxy", proxy, "--rounds", "2", *url)
        assert code == 0, err
        sessions = re.findall(r"\(session (\w+)\)", out)
        assert len(sessions) == 4 and sessions[0] == sessions[1]
        assert len(set(sessions)) == 3  # the first, then two new ones
        assert sessions[-1] == stack.registry.peek(stack.ports[0]).id
        usernames = {username for username, _, _ in stack.vendor.seen}
        assert usernames == {f"alice-session-{s}" for s in set(sessions)}
    finally:
        await stack.service.stopService()


@pytest_twisted.ensureDeferred
async def test_worker_says_what_went_wrong() -> None:
    stack = start_stack(1, session_api={"enabled": True, "domain": "portmapper"})
    try:
        proxy = f"http://127.0.0.1:{stack.ports[0]}"
        code, _, err = await worker("--proxy", proxy, "--url", "https://ip.sandbox/json")
        assert code == 2
        assert err.startswith("worker: ") and "certificate verify failed" in err
        assert "Traceback" not in err
    finally:
        await stack.service.stopService()
