"""
WebSockets through a mapped port with real peers (ws_peers.py): aiohttp's
plain ``GET ws://`` with Upgrade, and websockets' CONNECT, both to a
websockets server behind the sandbox vendor, on the port's session.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue

from .conftest import start_stack

pytestmark = pytest.mark.integration

if sys.version_info < (3, 11):  # setup.cfg: aiohttp and websockets test from 3.11 on
    pytest.skip("the WebSocket peers are test extras on Python 3.11+", allow_module_level=True)

PEERS = Path(__file__).with_name("ws_peers.py")


@pytest_twisted.ensureDeferred
async def test_websockets_through_a_mapped_port() -> None:
    stack = start_stack(1)
    try:
        port = stack.ports[0]
        out, err, code = await getProcessOutputAndValue(
            sys.executable, (str(PEERS), f"http://127.0.0.1:{port}"), env=dict(os.environ)
        )
        assert code == 0, err.decode()
        got = json.loads(out)
        assert got["aiohttp"] == ["HELLO 0", "HELLO 1", "HELLO 2", 256 * 1024]
        assert got["websockets"] == ["VIA CONNECT"]
        assert got["paths"] == ["/aiohttp", "/websockets"]

        # Both reached the vendor on the port's session: the upgrade as the
        # http:// request it stands for, the other as a CONNECT.
        session = stack.registry.peek(port)
        origin = f"127.0.0.1:{got['port']}"
        assert list(stack.vendor.seen) == [
            (f"alice-session-{session.id}", "GET", f"http://{origin}/aiohttp"),
            (f"alice-session-{session.id}", "CONNECT", origin),
        ]
        assert session.bytes_down > 256 * 1024 and session.bytes_up > 256 * 1024
    finally:
        await stack.service.stopService()
