"""
proxymap as operators run it: ``twistd -n proxymap --config FILE`` and
``twist proxymap --config FILE`` in their own process, stopped with SIGTERM.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from proxymap.sandbox.vendor import SandboxVendor

from .conftest import curl, free_ports

pytestmark = pytest.mark.integration


async def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):  # at most ~10 s
        assert proc.poll() is None, "proxymap exited during start-up"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        await deferLater(reactor, 0.05)
    pytest.fail(f"nothing listens on {port}")


@pytest.mark.parametrize(
    "argv",
    [["twistd", "-n", "--pidfile=", "proxymap"], ["twist", "proxymap"]],
    ids=["twistd", "twist"],
)
@pytest_twisted.ensureDeferred
async def test_runs_from_a_config_file(tmp_path: Path, argv: list[str]) -> None:
    vendor = SandboxVendor(user="alice", password="from-a-file")
    sandbox = reactor.listenTCP(0, vendor.factory(reactor), interface="127.0.0.1")
    a, b = free_ports(2)
    (tmp_path / "secret").write_text("from-a-file\n")
    config = tmp_path / "proxymap.toml"
    config.write_text(
        f"""
[[mapping]]
name = "file-test"
ports = [{a}, {b}]
upstream = "http://127.0.0.1:{sandbox.getHost().port}"
user = "alice"
pass = "file:{tmp_path / "secret"}"
lifetime = "5m"

[admin]
listen = ""
"""
    )
    log = (tmp_path / "out.log").open("wb")
    proc = subprocess.Popen(
        [*argv, "--config", str(config)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        await wait_listening(b, proc)
        exits = []
        for port in (a, a, b):
            code, out, err = await curl("-x", f"http://127.0.0.1:{port}", "http://ip.sandbox/")
            assert code == 0, err
            exits.append(json.loads(out)["ip"])
        assert exits[0] == exits[1] != exits[2]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait(timeout=10)
        log.close()
        await sandbox.stopListening()
    # Twisted re-raises SIGTERM after an orderly shutdown, so the process
    # ends "by signal", which systemd counts as a clean stop.
    assert status in (0, -signal.SIGTERM)
    output = (tmp_path / "out.log").read_text()
    assert "Main loop terminated" in output
    assert "from-a-file" not in output
    assert "session" in output and "started on port" in output
    # One line for the mapping, none per port ("PortFactory starting on
    # N", "(TCP Port N Closed)"), which a range of 1,000 ports made 2,000.
    assert output.count("sessions last") == 1
    assert "starting on" not in output and "Closed)" not in output
    assert "closed {count} mapped ports" in output or "closed 2 mapped ports" in output


@pytest_twisted.ensureDeferred
async def test_sandbox_runs_alone() -> None:
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxymap.sandbox",
            "--port",
            str(port),
            "--user",
            "u",
            "--password",
            "p",
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_listening(port, proc)
        code, out, err = await curl(
            "-x", f"http://127.0.0.1:{port}", "-U", "u-session-abc:p", "http://ip.sandbox/"
        )
        assert code == 0, err
        assert json.loads(out)["session"] == "abc"
        code, out, _ = await curl("-i", "-x", f"http://127.0.0.1:{port}", "http://ip.sandbox/")
        assert out.startswith(b"HTTP/1.1 407")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
