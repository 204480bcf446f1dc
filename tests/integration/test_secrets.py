"""
A full scenario with known vendor, release-API, admin and client passwords:
none of them appears in any log event, error page or API response.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from proxymap.config import parse_config
from proxymap.sandbox.vendor import SandboxVendor
from proxymap.tap import build_service

from .conftest import curl, free_ports

pytestmark = pytest.mark.integration

VENDOR = "VENDOR-pw-xyzzy"
API = "API-pw-quux"
ADMIN = "ADMIN-pw-plugh"
CLIENT = "CLIENT-pw-frob"


def forms(user: str, password: str) -> list[str]:
    return [password, base64.b64encode(f"{user}:{password}".encode()).decode()]


@pytest_twisted.ensureDeferred
async def test_no_secret_leaks() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    sandbox_port, release_port, admin_port, good, bad = free_ports(5)
    vendor = SandboxVendor(user="alice", password=VENDOR)
    listening = reactor.listenTCP(sandbox_port, vendor.factory(reactor), interface="127.0.0.1")
    base = {
        "upstream": f"http://127.0.0.1:{sandbox_port}",
        "user": "alice",
        "client_users": {"worker": CLIENT},
        "session_api": {"enabled": True, "domain": "portmapper"},
    }
    config = parse_config(
        {
            "mapping": [
                {
                    **base,
                    "name": "good",
                    "ports": [good],
                    "pass": VENDOR,
                    "params": {"service_type": "X"},
                    "release": {
                        "url": f"http://127.0.0.1:{release_port}/r/{{service_type}}",
                        "user": "api",
                        "pass": API,
                        "body": '{"data": {entries}}',
                        "entry": '{"sessionId": {session}}',
                        "retries": 0,
                    },
                },
                {**base, "name": "bad", "ports": [bad], "pass": VENDOR + "-wrong"},
            ],
            "admin": {"listen": f"tcp:{admin_port}:interface=127.0.0.1", "users": {"ops": ADMIN}},
        },
        env={},
    )
    service = build_service(config, reactor)
    service.privilegedStartService()
    service.startService()
    answers: list[bytes] = []
    try:
        client = ["-U", f"worker:{CLIENT}"]
        for argv in (
            [
                "-i",
                "--proxy-user",
                f"worker:{CLIENT}",
                "-x",
                f"http://127.0.0.1:{good}",
                "http://ip.sandbox/",
            ],
            [
                "-i",
                "--proxy-user",
                "worker:wrong",
                "-x",
                f"http://127.0.0.1:{good}",
                "http://ip.sandbox/",
            ],
            ["-i", "-x", f"http://127.0.0.1:{good}", "http://ip.sandbox/"],
            [
                "-i",
                "--proxy-user",
                f"worker:{CLIENT}",
                "-x",
                f"http://127.0.0.1:{bad}",
                "http://ip.sandbox/",
            ],
            [
                "-i",
                "--proxy-user",
                f"worker:{CLIENT}",
                "-x",
                f"http://127.0.0.1:{good}",
                "http://portmapper/session/new",
            ],
            ["-i", "--socks5-hostname", f"worker:{CLIENT}@127.0.0.1:{good}", "http://e.invalid/"],
            ["-i", *client, f"http://127.0.0.1:{admin_port}/sessions"],
            ["-i", "-u", "ops:wrong", f"http://127.0.0.1:{admin_port}/sessions"],
            ["-i", "-u", f"ops:{ADMIN}", f"http://127.0.0.1:{admin_port}/sessions"],
            ["-i", "-u", f"ops:{ADMIN}", f"http://127.0.0.1:{admin_port}/ports"],
            ["-i", "-u", f"ops:{ADMIN}", f"http://127.0.0.1:{admin_port}/openapi.json"],
            ["-i", "-u", f"ops:{ADMIN}", f"http://127.0.0.1:{admin_port}/nope"],
        ):
            _code, out, err = await curl(*argv)
            answers.append(out + err)
        response = await treq.put(
            f"http://127.0.0.1:{admin_port}/sessions/release",
            auth=("ops", ADMIN),
            data=json.dumps({"releaseAll": True}).encode(),
        )
        answers.append(await response.content())
        # The release call goes to a port where nothing listens: it fails and logs.
        releaser = service.releases[0]
        for _ in range(200):
            if releaser.failed:
                break
            await deferLater(reactor, 0.02)
        assert releaser.failed == 1
    finally:
        await service.stopService()
        await listening.stopListening()
        globalLogPublisher.removeObserver(events.append)

    assert any(b"407" in a for a in answers) and any(b"401" in a for a in answers)
    logged = "\n".join(formatEvent(e) + " " + " ".join(repr(v) for v in e.values()) for e in events)
    assert "released sessions" in logged or "failed" in logged
    texts = [a.decode("latin-1") for a in answers] + [logged]
    for user, password in (("alice", VENDOR), ("api", API), ("ops", ADMIN), ("worker", CLIENT)):
        for secret in forms(user, password):
            for text in texts:
                assert secret not in text, (user, text[:300])
