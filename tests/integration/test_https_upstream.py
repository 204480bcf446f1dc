"""
An ``https://`` upstream on real sockets: the sandbox vendor listening in
TLS with a certificate for 127.0.0.1, proxymap verifying it against the
mapping's ``upstream_ca``, and curl through the ports in plain HTTP, HTTPS
(CONNECT, TLS inside TLS) and SOCKS5.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.logger import LogLevel, capturedLogs, formatEvent

from proxymap.config import parse_config
from proxymap.dataplane.localtls import LocalCertificates
from proxymap.sandbox.vendor import SandboxVendor
from proxymap.tap import ProxymapService, build_service

from .conftest import Origin, curl, free_ports

pytestmark = pytest.mark.integration


@attrs.define
class Gateway:
    """
    The sandbox vendor behind TLS, and the certificate it shows.
    """

    vendor: SandboxVendor
    port: int
    ca: Path


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    certificates = LocalCertificates()
    ca = tmp_path / "gateway.pem"
    ca.write_bytes(certificates.pem("127.0.0.1"))
    vendor = SandboxVendor(user="alice", password="s3cret")
    listening = reactor.listenSSL(
        0, vendor.factory(reactor), certificates.server_options("127.0.0.1"), interface="127.0.0.1"
    )
    yield Gateway(vendor, listening.getHost().port, ca)
    pytest_twisted.blockon(listening.stopListening())


@pytest.fixture
def started() -> Iterator[list[ProxymapService]]:
    """
    The services a test started, stopped after it.
    """
    services: list[ProxymapService] = []
    yield services
    for service in services:
        pytest_twisted.blockon(service.stopService())


def start(services: list[ProxymapService], gateway: str, **mapping: Any) -> list[int]:
    ports = free_ports(2)
    raw = {
        "name": "tls",
        "ports": ports,
        "upstream": gateway,
        "user": "alice",
        "pass": "s3cret",
        **mapping,
    }
    config = parse_config({"mapping": [raw], "admin": {"listen": ""}}, env={})
    service = build_service(config, reactor, clock=task.Clock())
    service.privilegedStartService()
    service.startService()
    services.append(service)
    return ports


async def exit_through(*args: str) -> Any:
    code, out, err = await curl(*args)
    assert code == 0, err
    return json.loads(out)


@pytest_twisted.ensureDeferred
async def test_sticky_sessions_over_tls_to_the_gateway(
    gateway: Gateway, started: list[ProxymapService], origin: Origin, tmp_path: Path
) -> None:
    one, two = start(started, f"https://127.0.0.1:{gateway.port}", upstream_ca=str(gateway.ca))
    first = await exit_through("-x", f"http://127.0.0.1:{one}", "http://ip.sandbox/json")
    again = await exit_through("-x", f"http://127.0.0.1:{one}", "http://ip.sandbox/json")
    socks = await exit_through("--socks5-hostname", f"127.0.0.1:{one}", "http://ip.sandbox/json")
    assert first["session"] == again["session"] == socks["session"]
    other = await exit_through("-x", f"http://127.0.0.1:{two}", "http://ip.sandbox/json")
    assert other["ip"] != first["ip"]
    # The second request went over the first one's kept TLS connection.
    assert started[0].tally.pool is not None and started[0].tally.pool.reused >= 1
    # HTTPS to a real origin: CONNECT over TLS to the gateway, the
    # origin's TLS inside, verified by curl against the origin's own CA.
    echo = await exit_through(
        "--cacert",
        str(origin.cafile),
        "-x",
        f"http://127.0.0.1:{one}",
        f"https://localhost:{origin.tls_port}/hello",
    )
    assert echo["path"] == "/hello" and echo["proxy_authorization"] is False
    username = f"alice-session-{first['session']}"
    assert set(gateway.vendor.usernames) == {username, f"alice-session-{other['session']}"}
    # A body of 4 MiB through the vendor to a real origin, over TLS.
    body = tmp_path / "body"
    body.write_bytes(b"x" * (4 << 20))
    counted = await exit_through(
        "-x",
        f"http://127.0.0.1:{one}",
        "--data-binary",
        f"@{body}",
        f"http://127.0.0.1:{origin.port}/count",
    )
    assert counted == {"received": 4 << 20}


@pytest_twisted.ensureDeferred
async def test_a_gateway_certificate_that_fails_is_a_502_that_says_so(
    gateway: Gateway, started: list[ProxymapService]
) -> None:
    """
    Without ``upstream_ca`` the self-signed certificate chains to no system
    authority; through ``localhost`` it names the wrong host.  Either way
    the client gets a 502 saying why, the log a warning, and the vendor
    never sees the credentials.
    """
    untrusted, _ = start(started, f"https://127.0.0.1:{gateway.port}")
    misnamed, _ = start(started, f"https://localhost:{gateway.port}", upstream_ca=str(gateway.ca))
    with capturedLogs() as events:
        for port, why in (
            (untrusted, b"certificate verify failed"),
            (misnamed, b"its certificate does not name localhost"),
        ):
            for url in ("http://ip.sandbox/json", "https://example.com/"):
                _, out, err = await curl("-k", "-s", "-i", "-x", f"http://127.0.0.1:{port}", url)
                head = out.split(b"\r\n\r\n")[0] if url.startswith("http:") else out
                assert b"502" in head, (out, err)
                if url.startswith("http:"):
                    assert b"TLS with the upstream" in out and why in out, out
    assert gateway.vendor.usernames == {}
    warned = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
    assert any("TLS with the upstream" in line for line in warned), warned


def test_upstream_ca_needs_an_https_upstream(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(LocalCertificates().pem("127.0.0.1"))
    raw = {
        "ports": "10201",
        "upstream": "http://127.0.0.1:10000",
        "upstream_ca": str(ca),
    }
    with pytest.raises(Exception, match=r"mapping\[0\]\.upstream_ca: only an https://"):
        parse_config({"mapping": [raw]}, env={})
