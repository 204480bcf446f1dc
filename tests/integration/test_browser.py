"""
A real browser through mapped ports: headless Chromium given nothing but
``--proxy-server=127.0.0.1:PORT``, as the browsers and automation tools
proxymap is for use it.  Each port shows the browser its own sticky exit,
in plain HTTP, in HTTPS through CONNECT and over SOCKS5, and the Session API
replaces it from the browser too.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from .conftest import Stack, start_stack

pytestmark = pytest.mark.integration

#: Seconds a page load may take before the browser is killed.
DEADLINE = 60.0

_PRE = re.compile(r"<pre[^>]*>(.*?)</pre>", re.S)


class _Browser(ProcessProtocol):
    """
    Collects a browser's standard output; fires ``done`` with it when the
    browser exits.
    """

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        if reason.check(ProcessDone):
            self.done.callback(b"".join(self.out))
        else:
            tail = b"".join(self.err)[-2000:].decode(errors="replace")
            self.done.errback(AssertionError(f"chromium ended: {reason.value}\n{tail}"))


async def page_json(proxy: str, url: str, profile: Path) -> Any:
    """
    The JSON document at ``url`` as headless Chromium shows it through
    ``proxy``.  The browser runs in its own process group, which is killed
    when the load is over (or past :data:`DEADLINE`): Chromium's helper
    processes go with it.
    """
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed (.ci/run installs it)")
    setsid = shutil.which("setsid")
    assert setsid is not None
    args = [
        "--headless",
        "--no-sandbox",  # the suite runs as root in CI
        "--disable-gpu",
        "--no-first-run",
        # No update checks, sync or safe browsing calls through the proxy.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        f"--proxy-server={proxy}",
        "--proxy-bypass-list=<-loopback>",  # loopback targets go through it too
        "--ignore-certificate-errors",  # the sandbox's self-signed ip.sandbox
        "--dump-dom",
        url,
    ]
    browser = _Browser()
    process = reactor.spawnProcess(browser, setsid, [setsid, chromium, *args], env=dict(os.environ))
    group = process.pid

    def kill() -> None:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass

    deadline = reactor.callLater(DEADLINE, kill)
    try:
        dom = (await browser.done).decode()
    finally:
        if deadline.active():
            deadline.cancel()
        kill()  # whatever helper outlived the browser
    shown = _PRE.search(dom)
    assert shown is not None, dom[:2000]
    return json.loads(html.unescape(shown.group(1)))


@pytest.fixture
def browsed() -> Any:
    stack = start_stack(2, session_api={"enabled": True, "domain": "portmapper"})
    yield stack
    pytest_twisted.blockon(stack.service.stopService())


@pytest_twisted.ensureDeferred
async def test_a_browser_sees_each_ports_own_sticky_exit(browsed: Stack, tmp_path: Path) -> None:
    one, two = browsed.ports
    first = await page_json(f"127.0.0.1:{one}", "http://ip.sandbox/json", tmp_path / "a")
    session = browsed.registry.peek(one)
    assert session is not None and first["session"] == session.id
    tls = await page_json(f"127.0.0.1:{one}", "https://ip.sandbox/json", tmp_path / "b")
    socks = await page_json(f"socks5://127.0.0.1:{one}", "http://ip.sandbox/json", tmp_path / "c")
    assert first["ip"] == tls["ip"] == socks["ip"]
    other = await page_json(f"127.0.0.1:{two}", "http://ip.sandbox/json", tmp_path / "d")
    assert other["ip"] != first["ip"]
    # Only the ports' own session usernames reached the vendor.
    usernames = {f"alice-session-{browsed.registry.peek(p).id}" for p in (one, two)}
    assert set(browsed.vendor.usernames) == usernames


@pytest_twisted.ensureDeferred
async def test_a_browser_replaces_its_ports_session(browsed: Stack, tmp_path: Path) -> None:
    port = browsed.ports[0]
    proxy = f"127.0.0.1:{port}"
    before = await page_json(proxy, "http://ip.sandbox/json", tmp_path / "a")
    renewed = await page_json(proxy, "http://portmapper/session/new", tmp_path / "b")
    assert renewed["session_id"] != before["session"]
    after = await page_json(proxy, "https://ip.sandbox/json", tmp_path / "c")
    assert after["session"] == renewed["session_id"] and after["ip"] != before["ip"]
