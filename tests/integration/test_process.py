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
from twisted.internet.threads import deferToThread

from proxymap.sandbox.vendor import SandboxVendor

from ..helpers import with_open_files
from .conftest import curl, free_ports, stop_process

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
        status = stop_process(proc)
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
        stop_process(proc)


def _open_tunnels(port: int, count: int) -> list[bytes]:
    """
    Open ``count`` CONNECT tunnels through ``port`` and hold them all open
    until every answer is in; return each answer's status line.  Blocking:
    run in a thread, beside the reactor serving the sandbox.
    """
    held: list[socket.socket] = []
    answers = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(s)
            s.sendall(b"CONNECT ip.sandbox:80 HTTP/1.1\r\nHost: ip.sandbox:80\r\n\r\n")
            head = b""
            while b"\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
            answers.append(head.split(b"\r\n", 1)[0])
    finally:
        for s in held:
            s.close()
    return answers


async def _start_with_open_files(
    tmp_path: Path, soft: int, hard: int, ports: list[int], upstream: int, more: str = ""
) -> tuple[subprocess.Popen[bytes], Path]:
    config = tmp_path / "proxymap.toml"
    config.write_text(
        f"""
[[mapping]]
ports = {ports}
upstream = "http://127.0.0.1:{upstream}"
user = "alice"
pass = "pw"

[admin]
listen = ""
{more}
"""
    )
    out = tmp_path / "out.log"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [*with_open_files(soft, hard), "twist", "proxymap", "--config", str(config)],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, out


@pytest_twisted.ensureDeferred
async def test_the_soft_open_file_limit_is_raised(tmp_path: Path) -> None:
    """
    Started with a shell's soft limit of 256 under a hard limit of 4096,
    proxymap runs with 4096, and says nothing about it (4096 hold its 100
    connections).
    """
    (a,) = free_ports(1)
    proc, out = await _start_with_open_files(
        tmp_path, 256, 4096, [a], 9, "[limits]\nmax_connections = 100"
    )
    try:
        await wait_listening(a, proc)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert line.split()[3:5] == ["4096", "4096"]
    finally:
        stop_process(proc)
    assert "open-file limit" not in out.read_text()


@pytest_twisted.ensureDeferred
async def test_connections_beyond_the_open_file_limit_get_503(tmp_path: Path) -> None:
    """
    Under a hard limit of 200, two ports hold (200 - 2 - 64) // 2 = 67
    tunnels: one warning says so at start, the 68th client gets a 503
    rather than an ``EMFILE`` (a 502, or a connection dropped unanswered).
    """
    vendor = SandboxVendor(user="alice", password="pw")
    sandbox = reactor.listenTCP(0, vendor.factory(reactor), interface="127.0.0.1")
    a, b = free_ports(2)
    proc, out = await _start_with_open_files(tmp_path, 200, 200, [a, b], sandbox.getHost().port)
    try:
        await wait_listening(b, proc)
        answers = await deferToThread(_open_tunnels, a, 70)
        # All of it is given back once proxymap has read the 67 closes,
        # which it may not have the moment they are sent.
        for _ in range(100):  # at most ~5 s
            again = await deferToThread(_open_tunnels, b, 1)
            if again != [b"HTTP/1.1 503 Service Unavailable"]:
                break
            await deferLater(reactor, 0.05)
        answers += again
    finally:
        stop_process(proc)
        await sandbox.stopListening()
    established = b"HTTP/1.1 200 Connection established"
    assert answers == [established] * 67 + [b"HTTP/1.1 503 Service Unavailable"] * 3 + [established]
    output = out.read_text()
    assert (
        "the open-file limit (200) holds 2 ports and 67 connections, not max_connections = 9000"
        in output
    )
    assert "EMFILE" not in output


def test_ports_beyond_the_open_file_limit_end_start_up(tmp_path: Path) -> None:
    ports = list(range(30001, 30101))  # not bound: start-up ends before listening
    config = tmp_path / "proxymap.toml"
    config.write_text(f'[[mapping]]\nports = {ports}\nupstream = "http://127.0.0.1:9"\n')
    result = subprocess.run(
        [*with_open_files(128, 128), "twistd", "-n", "proxymap", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"proxymap: {config}: the open-file limit (128) cannot hold 100 ports (each takes one, "
        "and 64 are kept aside): raise it (ulimit -n, or LimitNOFILE= in the systemd unit) "
        "or map fewer ports"
    )
    assert "Traceback" not in result.stdout + result.stderr
