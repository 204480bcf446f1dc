"""
The admin API on a real port: DELETE closes real sockets, and schemathesis
checks the live API against its own OpenAPI document.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from proxymap.sandbox.vendor import SandboxFactory

from .conftest import Origin, curl, free_ports, start_stack
from .origin import self_signed_certificate

pytestmark = pytest.mark.integration


class TunnelClient(Protocol):
    """
    Opens a CONNECT tunnel to the origin and keeps it open until closed.
    """

    def __init__(self, target: bytes) -> None:
        self.target = target
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.data = b""

    def connectionMade(self) -> None:
        self.transport.write(b"CONNECT %s HTTP/1.1\r\n\r\n" % self.target)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.opened.called and b"\r\n\r\n" in self.data:
            assert self.data.startswith(b"HTTP/1.1 200")
            self.transport.write(b"HALFCLOSE and wait")
            self.opened.callback(None)

    def connectionLost(self, reason: object) -> None:
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_delete_closes_client_and_upstream_sockets(origin: Origin) -> None:
    (admin_port,) = free_ports(1)
    stack = start_stack(1, admin={"listen": f"tcp:{admin_port}:interface=127.0.0.1"})
    try:
        client = TunnelClient(b"127.0.0.1:%d" % origin.port)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", stack.ports[0])
        await connectProtocol(endpoint, client)
        await client.opened
        sandbox = next(
            listener.factory
            for listener in stack.service.listeners()
            if isinstance(listener.factory, SandboxFactory)
        )
        assert len(sandbox.connections) == 1
        session = stack.registry.peek(stack.ports[0])

        url = f"http://127.0.0.1:{admin_port}/sessions/{session.id}"
        listed = await (await treq.get(url + "/connections")).json()
        assert [c["state"] for c in listed] == ["tunnel"]
        response = await treq.delete(url)
        assert response.code == 204

        await client.closed  # the client sees its connection drop
        for _ in range(100):  # the vendor sees its side close (bounded wait)
            if not sandbox.connections:
                break
            await deferLater(reactor, 0.02)
        assert sandbox.connections == {}
        assert (await treq.get(url)).code == 404
    finally:
        await stack.service.stopService()


@pytest_twisted.ensureDeferred
async def test_schemathesis_against_the_live_api(tmp_path: Path) -> None:
    """
    Every documented operation, with generated valid and invalid inputs,
    answers as the OpenAPI document says (status codes, content types,
    schemas, 401 without credentials, 405 for other methods).
    """
    if sys.version_info < (3, 11):
        pytest.skip("schemathesis 4.30 needs Python 3.11 (setup.cfg's test extras)")
    st = shutil.which("schemathesis") or shutil.which("st")
    if st is None:
        pytest.fail("schemathesis is not installed (it is in the test extras)")
    (admin_port,) = free_ports(1)
    stack = start_stack(
        3,
        admin={"listen": f"tcp:{admin_port}:interface=127.0.0.1", "users": {"ops": "pa55word"}},
        session_params={"country": ""},
        username="{user}[-country-{country}]-session-{session}",
    )
    for port in stack.ports[:2]:
        stack.registry.current(port)
    try:
        out, err, code = await getProcessOutputAndValue(
            st,
            (
                "run",
                f"http://127.0.0.1:{admin_port}/openapi.json",
                "--auth",
                "ops:pa55word",
                "--checks",
                "all",
                "--max-examples",
                "25",
                "--seed",
                "1",
                "--no-color",
                "--report",
                "junit",
                "--report-dir",
                str(tmp_path),
            ),
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
            path=str(tmp_path),
        )
    finally:
        await stack.service.stopService()
    output = (out + err).decode()
    assert code == 0, output[-6000:]
    assert "pa55word" not in json.dumps(output)


@pytest_twisted.ensureDeferred
async def test_an_oversized_upload_is_refused_and_the_api_keeps_serving(tmp_path: Path) -> None:
    """
    curl uploading more than the admin API takes, without credentials, gets
    the 413 without the body being read; the next request is served.
    """
    from proxymap.admin.site import MAX_BODY

    (admin_port,) = free_ports(1)
    stack = start_stack(
        1, admin={"listen": f"tcp:{admin_port}:interface=127.0.0.1", "users": {"ops": "pa55word"}}
    )
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (4 * MAX_BODY))
    url = f"http://127.0.0.1:{admin_port}/sessions/release"
    try:
        out, err, code = await getProcessOutputAndValue(
            "curl",
            ("-sS", "-X", "PUT", "--data-binary", f"@{big}", "-w", "\n%{http_code}", url),
            env=os.environ,
        )
        body, _, status = out.decode().rpartition("\n")
        assert (code, status) == (0, "413"), (out, err)
        assert json.loads(body)["error"] == "content too large"

        response = await treq.put(url, b'{"releaseAll": true}', auth=("ops", "pa55word"))
        assert response.code == 200
        assert (await response.json())["success"] is True
    finally:
        await stack.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_admin_api_over_tls(tmp_path: Path) -> None:
    """
    ``listen = "ssl:..."``: curl, which offers h2 and http/1.1 by ALPN, gets
    HTTP/1.1 with the certificate given, and the API behind it answers.
    """
    cert, key = self_signed_certificate()
    (tmp_path / "admin.pem").write_bytes(cert)
    (tmp_path / "admin.key").write_bytes(key)
    (admin_port,) = free_ports(1)
    listen = (
        f"ssl:{admin_port}:interface=127.0.0.1"
        f":privateKey={tmp_path / 'admin.key'}:certKey={tmp_path / 'admin.pem'}"
    )
    stack = start_stack(1, admin={"listen": listen, "users": {"ops": "pa55word"}})
    try:
        url = f"https://127.0.0.1:{admin_port}/sessions"
        code, out, err = await curl(
            "--cacert", str(tmp_path / "admin.pem"), "-u", "ops:pa55word",
            "-w", "\n%{http_version} %{response_code}", url,
        )  # fmt: skip
        assert code == 0, err
        body, _, status = out.rpartition(b"\n")
        assert status == b"1.1 200"
        assert json.loads(body) == []
        code, out, _ = await curl(
            "--cacert", str(tmp_path / "admin.pem"), "-w", "%{http_code}", url
        )
        assert (code, out[-3:]) == (0, b"401")
    finally:
        await stack.service.stopService()
