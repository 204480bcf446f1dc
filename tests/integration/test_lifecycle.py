"""
proxymap as systemd runs it: READY/STOPPING notifications, a graceful stop
on SIGTERM that lets a tunnel finish and exits 0, and sessions that survive a
restart (real processes).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater

from proxymap.sandbox.vendor import SandboxVendor

from .conftest import Origin, curl, free_ports, stop_process
from .test_process import wait_listening

pytestmark = pytest.mark.integration


@pytest.fixture
def sandbox() -> Iterator[int]:
    vendor = SandboxVendor(user="alice", password="s3cret")
    listening = reactor.listenTCP(0, vendor.factory(reactor), interface="127.0.0.1")
    yield listening.getHost().port
    pytest_twisted.blockon(listening.stopListening())


class Daemon:
    def __init__(self, tmp_path: Path, sandbox: int, ports: list[int], grace: str) -> None:
        self.tmp_path = tmp_path
        self.ports = ports
        self.state = tmp_path / "state" / "sessions.json"
        self.config = tmp_path / "proxymap.toml"
        self.config.write_text(
            f'[service]\ngrace = "{grace}"\nstate_file = "{self.state}"\n'
            f'[admin]\nlisten = ""\n[[mapping]]\nports = {ports}\n'
            f'upstream = "http://127.0.0.1:{sandbox}"\nuser = "alice"\npass = "s3cret"\n'
        )
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp_path / "notify.sock"))
        self.notify.setblocking(False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> subprocess.Popen[bytes]:
        self.runs += 1
        env = {**os.environ, "NOTIFY_SOCKET": str(self.tmp_path / "notify.sock")}
        log = (self.tmp_path / f"run{self.runs}.log").open("wb")
        self.proc = subprocess.Popen(
            ["twist", "--log-format=text", "proxymap", "--config", str(self.config)],
            cwd=self.tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self.proc

    def log(self) -> str:
        return (self.tmp_path / f"run{self.runs}.log").read_text()

    async def message(self) -> bytes:
        for _ in range(250):  # at most ~5 s
            try:
                return self.notify.recv(100)
            except BlockingIOError:
                await deferLater(reactor, 0.02)
        pytest.fail("no notification")

    async def exited(self, limit: float = 15) -> int:
        assert self.proc is not None
        for _ in range(int(limit / 0.05)):
            if self.proc.poll() is not None:
                return self.proc.returncode
            await deferLater(reactor, 0.05)
        pytest.fail("proxymap did not exit")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.notify.close()


@pytest.fixture
def daemon(tmp_path: Path, sandbox: int) -> Iterator[Daemon]:
    d = Daemon(tmp_path, sandbox, free_ports(2), grace="5s")
    yield d
    d.stop()


class Tunnel(Protocol):
    def __init__(self, target: bytes) -> None:
        self.target = target
        self.data = b""
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"CONNECT %s HTTP/1.1\r\n\r\nECHO first" % self.target)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(None)

    async def wait_for(self, marker: bytes) -> None:
        for _ in range(250):
            if marker in self.data:
                return
            await deferLater(reactor, 0.02)
        pytest.fail(f"never received {marker!r}")


@pytest_twisted.ensureDeferred
async def test_graceful_stop_lets_a_tunnel_finish(daemon: Daemon, origin: Origin) -> None:
    daemon.start()
    port = daemon.ports[0]
    await wait_listening(port, daemon.proc)
    assert await daemon.message() == b"READY=1"
    tunnel = Tunnel(b"127.0.0.1:%d" % origin.port)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), tunnel)
    await tunnel.wait_for(b"ECHO first")

    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.message() == b"STOPPING=1"
    for _ in range(100):  # no longer accepting
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        await deferLater(reactor, 0.02)
    else:
        pytest.fail("the port still accepts after SIGTERM")
    tunnel.transport.write(b" and more")  # the tunnel in flight goes on
    await tunnel.wait_for(b"and more")
    assert daemon.proc.poll() is None
    started = time.monotonic()
    tunnel.transport.loseConnection()
    assert await daemon.exited() == 0
    assert time.monotonic() - started < 4  # it did not wait out the grace
    saved = json.loads(daemon.state.read_text())
    assert [s["port"] for s in saved["sessions"]] == [port]


@pytest_twisted.ensureDeferred
async def test_grace_runs_out(tmp_path: Path, sandbox: int, origin: Origin) -> None:
    daemon = Daemon(tmp_path, sandbox, free_ports(1), grace="1s")
    try:
        daemon.start()
        await wait_listening(daemon.ports[0], daemon.proc)
        tunnel = Tunnel(b"127.0.0.1:%d" % origin.port)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.ports[0]), tunnel)
        await tunnel.wait_for(b"ECHO first")
        daemon.proc.send_signal(signal.SIGTERM)
        await tunnel.closed  # cut when the grace ran out
        assert await daemon.exited() == 0
        assert "closing 1 connections still open after the grace" in daemon.log()
    finally:
        daemon.stop()


@pytest_twisted.ensureDeferred
async def test_restart_keeps_sessions(daemon: Daemon) -> None:
    async def exits() -> list[str]:
        await wait_listening(daemon.ports[-1], daemon.proc)
        seen = []
        for port in daemon.ports:
            code, out, err = await curl("-x", f"http://127.0.0.1:{port}", "http://ip.sandbox/")
            assert code == 0, err
            seen.append(json.loads(out)["session"])
        return seen

    daemon.start()
    first = await exits()
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.exited() == 0
    daemon.start()
    assert await exits() == first
    assert "restored 2 sessions" in daemon.log()
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.exited() == 0

    daemon.state.write_text("{ corrupt")
    daemon.start()
    fresh = await exits()
    assert set(fresh).isdisjoint(first)
    assert "is corrupt" in daemon.log()
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.exited() == 0


@pytest_twisted.ensureDeferred
async def test_reload_on_sighup(tmp_path: Path, sandbox: int, origin: Origin) -> None:
    a, b, c, d = free_ports(4)

    def config(*mappings: str) -> None:
        text = '[admin]\nlisten = ""\n'
        for body in mappings:
            text += (
                f'[[mapping]]\n{body}\nupstream = "http://127.0.0.1:{sandbox}"\n'
                'user = "alice"\npass = "s3cret"\n'
            )
        daemon.config.write_text(text)

    async def session_of(port: int, host: str = "127.0.0.1") -> str:
        code, out, err = await curl("-x", f"http://{host}:{port}", "http://ip.sandbox/")
        assert code == 0, err
        return json.loads(out)["username"]

    async def reload() -> None:
        daemon.proc.send_signal(signal.SIGHUP)
        assert await daemon.message() == b"RELOADING=1"
        assert await daemon.message() == b"READY=1"

    daemon = Daemon(tmp_path, sandbox, [a], grace="5s")
    try:
        config(
            f'name = "same"\nports = [{a}]',
            f'name = "changing"\nports = [{b}]',
            f'name = "leaving"\nports = [{c}]',
        )
        daemon.start()
        await wait_listening(c, daemon.proc)
        assert await daemon.message() == b"READY=1"
        before = {port: await session_of(port) for port in (a, b, c)}
        tunnel = Tunnel(b"127.0.0.1:%d" % origin.port)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", a), tunnel)
        await tunnel.wait_for(b"ECHO first")

        config(
            f'name = "same"\nports = [{a}]',
            f'name = "changing"\nports = [{b}]\nusername = "{{user}}-session-{{session}}-v-2"',
            f'name = "arriving"\nports = [{d}]',
        )
        await reload()

        assert await session_of(a) == before[a]  # untouched
        tunnel.transport.write(b" still here")  # and its open tunnel too
        await tunnel.wait_for(b"still here")
        renewed = await session_of(b)
        assert renewed != before[b] and renewed.endswith("-v-2")
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", c)) != 0  # removed
        assert (await session_of(d)).startswith("alice-session-")  # added

        daemon.config.write_text("[[mapping]\nbroken")
        await reload()
        assert await session_of(a) == before[a]
        assert "reload rejected, the running configuration stays" in daemon.log()

        config(  # "same" moves to another address: READY once it listens there
            f'name = "same"\nports = [{a}]\nbind = "127.0.0.2"',
            f'name = "changing"\nports = [{b}]\nusername = "{{user}}-session-{{session}}-v-2"',
            f'name = "arriving"\nports = [{d}]',
        )
        await reload()
        assert await session_of(a, "127.0.0.2") == before[a]  # the same session
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", a)) != 0  # not where it was
        tunnel.transport.write(b" and after the move")  # its open tunnel stays
        await tunnel.wait_for(b"and after the move")
        assert "1 moved to another address" in daemon.log()

        tunnel.transport.loseConnection()
        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.exited() == 0
    finally:
        daemon.stop()


UNIT = Path(__file__).resolve().parent.parent.parent / "examples" / "proxymap.service"


def reload_as_systemd_would(daemon: Daemon) -> subprocess.CompletedProcess[str]:
    """
    The shipped unit's ``ExecReload=`` lines, pointed at this environment
    and ``daemon``, run as systemd runs them: in order, stopping at the
    first that fails, whose result (the reload job's) is returned.
    """
    assert daemon.proc is not None
    commands = [
        line.split("=", 1)[1]
        .replace("/opt/proxymap/bin/", f"{Path(sys.executable).parent}/")
        .replace("/etc/proxymap/proxymap.toml", str(daemon.config))
        .replace("$MAINPID", str(daemon.proc.pid))
        for line in UNIT.read_text().splitlines()
        if line.startswith("ExecReload=")
    ]
    assert len(commands) == 2  # the check, then the SIGHUP
    for command in commands:
        result = subprocess.run(
            shlex.split(command), capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            break
    return result


@pytest_twisted.ensureDeferred
async def test_the_units_reload_checks_the_file_first(tmp_path: Path, sandbox: int) -> None:
    """
    ``systemctl reload`` with the shipped unit: a good file is checked and
    applied; a bad one fails the reload with the problem in one line, and
    proxymap never hears of it (no SIGHUP: no RELOADING=1, no rejection in
    its log), its ports serving on.
    """
    a, b = free_ports(2)
    daemon = Daemon(tmp_path, sandbox, [a], grace="5s")
    good = daemon.config.read_text()
    try:
        daemon.start()
        await wait_listening(a, daemon.proc)
        assert await daemon.message() == b"READY=1"

        daemon.config.write_text(good.replace(f"ports = {[a]}", f"ports = {[a, b]}"))
        result = reload_as_systemd_would(daemon)
        assert result.returncode == 0, result.stderr
        assert await daemon.message() == b"RELOADING=1"
        assert await daemon.message() == b"READY=1"
        await wait_listening(b, daemon.proc)

        daemon.config.write_text(good.replace("[[mapping]]", "[[mapping]]\ncolour = 1"))
        result = reload_as_systemd_would(daemon)
        assert result.returncode == 1
        assert result.stderr.strip() == f"proxymap: {daemon.config}: mapping[0].colour: unknown key"
        await deferLater(reactor, 0.5)
        with pytest.raises(BlockingIOError):
            daemon.notify.recv(100)
        assert "reload rejected" not in daemon.log()
        code, _, err = await curl("-x", f"http://127.0.0.1:{b}", "http://ip.sandbox/")
        assert code == 0, err

        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.exited() == 0
    finally:
        daemon.stop()


@pytest_twisted.ensureDeferred
async def test_a_demo_stop_releases_its_sessions(tmp_path: Path) -> None:
    """
    The demo keeps no state file, so SIGTERM ends its sessions, and the
    sandbox's release API (still serving: it stops last) hears of them
    before the process exits.
    """
    sandbox, port, admin, release = free_ports(4)
    log = tmp_path / "demo.log"
    demo = {"ports": port, "sandbox-port": sandbox, "admin-port": admin, "release-port": release}
    options = [arg for key, value in demo.items() for arg in (f"--demo-{key}", str(value))]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["twist", "--log-format=text", "proxymap", "--demo", *options],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await wait_listening(port, proc)
        code, out, err = await curl("-x", f"http://127.0.0.1:{port}", "http://ip.sandbox/")
        assert code == 0, err
        session = json.loads(out)["session"]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for _ in range(300):  # at most ~15 s
            if proc.poll() is not None:
                break
            await deferLater(reactor, 0.05)
        assert proc.returncode == 0
        assert time.monotonic() - started < 5  # the vendor answered: no grace waited out
        said = log.read_text()
        assert f"session {session} of port {port} ended: stopped" in said
        assert f"released sessions ['{session}'] of sandbox at the vendor" in said
        assert "abandoned" not in said and "Traceback" not in said
    finally:
        stop_process(proc)
