"""
Vendor release end to end on loopback: the admin API releases a session,
proxymap calls the sandbox vendor's release API with a real HTTP client, and
the sandbox gives the released id a new exit.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.web.server import Site

from proxymap.sandbox.release_api import ReleaseAPI

from .conftest import Stack, curl, free_ports, start_stack

pytestmark = pytest.mark.integration


def releasing(nports: int, path: str, entry: str, **mapping: Any) -> tuple[Stack, Any]:
    """
    A stack whose mapping releases its sessions, one ``entry`` each, at
    ``path`` of the sandbox's release API, listening on a free port.
    """
    (api_port,) = free_ports(1)
    stack = start_stack(
        nports,
        release={
            "url": f"http://127.0.0.1:{api_port}{path}",
            "user": "api",
            "pass": "api-secret",
            "body": '{"data": {entries}}',
            "entry": entry,
        },
        **mapping,
    )
    stack.vendor.api_user, stack.vendor.api_password = "api", "api-secret"
    site = reactor.listenTCP(api_port, Site(ReleaseAPI(stack.vendor)), interface="127.0.0.1")
    return stack, site


@pytest_twisted.ensureDeferred
async def test_release_reaches_the_sandbox_vendor() -> None:
    (admin_port,) = free_ports(1)
    stack, site = releasing(
        1,
        "/sessions/release/{service_type}",
        '{"port": {upstream_port}, "sessionId": {session}}',
        admin={"listen": f"tcp:{admin_port}:interface=127.0.0.1"},
        params={"service_type": "RESIDENTIAL-PREMIUM"},
    )
    try:
        port = stack.ports[0]
        code, out, err = await curl("-x", f"http://127.0.0.1:{port}", "http://ip.sandbox/")
        assert code == 0, err
        before = json.loads(out)

        with capturedLogs() as events:
            response = await treq.put(
                f"http://127.0.0.1:{admin_port}/sessions/release",
                data=json.dumps({"data": [{"port": port}]}).encode(),
            )
            assert (await response.json())["released"] == [
                {"port": port, "sessionId": before["session"]}
            ]
            releaser = stack.service.releases[0]
            for _ in range(100):  # bounded wait for the batched call and its answer
                if releaser.succeeded:
                    break
                await deferLater(reactor, 0.02)
        # One line for the call, none from the release client's factory
        # (the test's own treq client, to the admin API, may log its own).
        said = [formatEvent(e) for e in events if e.get("log_level") != LogLevel.debug]
        to_vendor = f"127.0.0.1:{site.getHost().port}>"
        assert [line for line in said if "factory" in line and to_vendor in line] == [], said
        assert any(line.startswith("released sessions") for line in said), said
        assert stack.vendor.release_calls == [
            {
                "method": "PUT",
                "path": "/sessions/release/RESIDENTIAL-PREMIUM",
                "user": "api",
                "body": {"data": [{"port": stack.sandbox_port, "sessionId": before["session"]}]},
            }
        ]
        assert releaser.succeeded == 1
        # The sandbox forgot the id: used again, it gets another exit.
        code, out, err = await curl(
            "-x",
            f"http://127.0.0.1:{stack.sandbox_port}",
            "-U",
            f"alice-session-{before['session']}:s3cret",
            "http://ip.sandbox/",
        )
        assert json.loads(out)["ip"] != before["ip"]
    finally:
        await stack.service.stopService()  # first: a stop may release at the site
        await site.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_reload_releases_the_session_of_a_port_it_removes() -> None:
    """
    A reload closes the sessions of the ports it removes, and the vendor
    hears of it: the release goes out, though the reload rebuilt the
    release settings in the same stroke.
    """
    stack, site = releasing(2, "/sessions/release/x", '{"sessionId": {session}}')
    try:
        kept, removed = stack.ports
        code, out, err = await curl("-x", f"http://127.0.0.1:{removed}", "http://ip.sandbox/")
        assert code == 0, err
        session = json.loads(out)["session"]
        config = stack.service.config
        assert config is not None
        (mapping,) = config.mappings
        await stack.service.apply(
            attrs.evolve(config, mappings=(attrs.evolve(mapping, ports=(kept,)),))
        )
        assert removed not in stack.registry.ports()
        for _ in range(100):  # bounded wait for the batched call and its answer
            if stack.vendor.release_calls:
                break
            await deferLater(reactor, 0.02)
        assert [call["body"] for call in stack.vendor.release_calls] == [
            {"data": [{"sessionId": session}]}
        ]
    finally:
        await stack.service.stopService()  # first: a stop may release at the site
        await site.stopListening()
