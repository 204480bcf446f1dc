"""
The tap: options, service assembly on a MemoryReactorClock, the plugin, and
what a user sees on the command line when the configuration is bad.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.plugin import getPlugins
from twisted.python import usage

import proxymap
from proxymap import tap
from proxymap.admin.views import port_view
from proxymap.dataplane.port import PortFactory
from proxymap.sandbox.vendor import SandboxFactory

from .helpers import with_open_files

GOOD = """
[admin]
listen = "tcp:28700:interface=127.0.0.1"

[[mapping]]
name = "a"
ports = "20001-20003"
upstream = "http://127.0.0.1:9"
user = "alice"
pass = "s3cret"

[[mapping]]
name = "b"
ports = [20010]
bind = "::1"
upstream = "http://127.0.0.1:9"
"""


def options(*argv: str) -> tap.Options:
    opts = tap.Options()
    opts.parseOptions(list(argv))
    return opts


def from_config(
    tmp_path: Path, text: str = GOOD, open_files: int = 100_000
) -> tuple[tap.ProxymapService, MemoryReactorClock]:
    """
    The service ``makeService`` builds from a file holding ``text``, on a
    memory reactor, as if the open-file limit were ``open_files``; not started.
    """
    path = tmp_path / "proxymap.toml"
    path.write_text(text)
    reactor = MemoryReactorClock()
    service = tap.makeService(
        options("--config", str(path)), reactor=reactor, open_files=lambda: open_files
    )
    return service, reactor


def test_plugin_is_found() -> None:
    """
    An import error in the plugin would make proxymap vanish silently from
    ``twistd --help``; this is the test that notices.
    """
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "proxymap" in makers
    assert makers["proxymap"].options is tap.Options


def test_demo_listens_on_its_default_ports() -> None:
    """
    ``--demo`` with no port options: the defaults are port numbers too (an
    option's default is not passed through its coercer).
    """
    reactor = MemoryReactorClock()
    service = tap.makeService(options("--demo"), reactor=reactor)
    service.privilegedStartService()
    service.startService()
    listening = {port for port, _, _, _ in reactor.tcpServers}
    assert {10199, 10200, 10201, 10210} <= listening
    service.stopService()


def test_make_service_listens_on_every_port(tmp_path: Path) -> None:
    service, reactor = from_config(tmp_path)
    service.privilegedStartService()
    service.startService()
    listening = [(port, interface) for port, _, _, interface in reactor.tcpServers]
    assert listening == [
        (20001, "127.0.0.1"),
        (20002, "127.0.0.1"),
        (20003, "127.0.0.1"),
        (20010, "::1"),
        (28700, "127.0.0.1"),
    ]
    assert service.admin is not None
    factories = [factory for _, factory, _, _ in reactor.tcpServers[:-1]]
    assert all(isinstance(f, PortFactory) for f in factories)
    assert [f.port for f in factories] == [20001, 20002, 20003, 20010]
    assert sorted(service.registry.ports()) == [20001, 20002, 20003, 20010]
    service.stopService()
    assert reactor.getDelayedCalls() == []


def test_one_line_per_mapping_not_per_port(tmp_path: Path) -> None:
    """
    Start-up says, once per mapping, which ports listen and where they go
    (the ports themselves log nothing: see test_reactor), where the admin
    API listens, and at the stop how many ports closed.  No secret in any.
    """
    service, _ = from_config(tmp_path)
    assert service.config is not None
    lifetimes = [f"{m.lifetime:g}" for m in service.config.mappings]
    with capturedLogs() as events:
        service.privilegedStartService()
        service.startService()
        service.stopService()
    lines = [formatEvent(e) for e in events]
    assert [line for line in lines if line.startswith("mapping ")] == [
        "mapping a: 3 ports on 127.0.0.1:20001-20003, upstream http://127.0.0.1:9, "
        f"sessions last {lifetimes[0]}s",
        f"mapping b: 1 port on [::1]:20010, upstream http://127.0.0.1:9, "
        f"sessions last {lifetimes[1]}s",
    ]
    (admin,) = [line for line in lines if line.startswith("admin API")]
    assert admin.startswith("admin API listening on ") and admin.endswith(":28700")
    assert "closed 4 mapped ports" in lines
    assert not [line for line in lines if "s3cret" in line]


def test_a_reload_names_the_ports_it_added_and_removed(tmp_path: Path) -> None:
    service, _ = from_config(tmp_path)
    service.privilegedStartService()
    service.startService()
    (tmp_path / "proxymap.toml").write_text(
        GOOD.replace('ports = "20001-20003"', 'ports = "20002-20005"')
    )
    with capturedLogs() as events:
        service.reload()
    service.stopService()
    said = [formatEvent(e) for e in events if formatEvent(e).startswith("reloaded:")]
    assert said == ["reloaded: 2 ports added (20004-20005), 1 removed (20001), 0 sessions renewed"]


def test_a_timeout_a_reload_lowers_applies_to_open_connections(tmp_path: Path) -> None:
    """
    A client connection that has said nothing is closed at the reloaded
    ``head_timeout``, not at the one its timer was armed with.
    """
    service, reactor = from_config(tmp_path)
    service.privilegedStartService()
    service.startService()
    proto = service.factories[20001].buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    client = StringTransport()
    proto.makeConnection(client)
    reactor.advance(1)
    (tmp_path / "proxymap.toml").write_text(GOOD + '\n[limits]\nhead_timeout = "5s"\n')
    service.reload()
    reactor.advance(3.9)
    assert not client.disconnecting
    reactor.advance(0.2)  # 5 s and at most a tick
    assert client.disconnecting
    service.stopService()


def test_no_reload_during_a_stop(tmp_path: Path) -> None:
    """
    A SIGHUP during a stop (its grace, or its wait for vendor releases)
    would listen again on the ports just closed, and tell systemd
    ``READY=1``: it is logged and ignored.
    """
    service, reactor = from_config(tmp_path)
    service.privilegedStartService()
    service.startService()
    Deferred.fromCoroutine(service.graceful_stop())
    (tmp_path / "proxymap.toml").write_text(
        GOOD.replace('ports = "20001-20003"', 'ports = "20002-20005"')
    )
    listened = len(reactor.tcpServers)
    with capturedLogs() as events:
        service.reload()
    assert len(reactor.tcpServers) == listened
    assert sorted(service.factories) == [20001, 20002, 20003, 20010]
    assert [formatEvent(e) for e in events] == ["SIGHUP: not reloading, proxymap is stopping"]
    service.stopService()


def test_max_connections_is_fitted_to_the_open_file_limit(tmp_path: Path) -> None:
    """
    GOOD maps 4 ports: a limit of 4 + 64 + 2 * 10 descriptors holds 10
    connections, and every port is held to 10 (test_limits: the 11th gets
    503); one warning says so.
    """
    with capturedLogs() as events:
        service, _ = from_config(tmp_path, open_files=4 + 64 + 20)
    assert {f.limits.max_connections for f in service.factories.values()} == {10}
    said = [formatEvent(e) for e in events if e["log_level"].name == "warn"]
    assert said[0].startswith(
        "the open-file limit (88) holds 4 ports and 10 connections, not max_connections = 9000"
    )
    assert service.config is not None and service.config.limits.max_connections == 10


def test_a_limit_that_holds_everything_changes_nothing(tmp_path: Path) -> None:
    with capturedLogs() as events:
        service, _ = from_config(tmp_path, open_files=4 + 64 + 2 * 9000)
    assert {f.limits.max_connections for f in service.factories.values()} == {9000}
    assert not [e for e in events if "open-file" in formatEvent(e)]


def test_ports_beyond_the_open_file_limit_end_start_up(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        from_config(tmp_path, open_files=60)
    assert str(e.value).startswith(
        f"proxymap: {tmp_path / 'proxymap.toml'}: the open-file limit (60) cannot hold 4 ports"
    )


def test_a_reload_is_fitted_to_the_open_file_limit(tmp_path: Path) -> None:
    """
    A reload's ports and limits are fitted as start-up's were; ports the
    limit cannot hold reject the reload, and the running ports stay.
    """
    service, _ = from_config(tmp_path, open_files=4 + 64 + 20)
    service.privilegedStartService()
    service.startService()
    path = tmp_path / "proxymap.toml"
    path.write_text(GOOD.replace('ports = "20001-20003"', 'ports = "20001-20005"'))
    with capturedLogs() as events:
        service.reload()
    assert sorted(service.factories) == [20001, 20002, 20003, 20004, 20005, 20010]
    assert {f.limits.max_connections for f in service.factories.values()} == {9}
    assert any("holds 6 ports and 9 connections" in formatEvent(e) for e in events)
    path.write_text(GOOD.replace('ports = "20001-20003"', 'ports = "20011-20040"'))
    with capturedLogs() as events:
        service.reload()
    assert len(service.factories) == 6
    (said,) = [formatEvent(e) for e in events if e["log_level"].name == "error"]
    assert said == (
        f"reload rejected, the running configuration stays: {path}: the open-file limit (88) "
        "cannot hold 31 ports (each takes one, and 64 are kept aside): raise it (ulimit -n, "
        "or LimitNOFILE= in the systemd unit) or map fewer ports"
    )
    service.stopService()


def test_a_select_reactor_keeps_its_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    ``select()`` cannot watch descriptors past 1023: under the select
    reactor the limit is neither raised nor fitted.
    """
    from twisted.internet.selectreactor import SelectReactor

    assert tap._selects(SelectReactor.__new__(SelectReactor))  # not started, not installed
    assert not tap._selects(MemoryReactorClock())
    monkeypatch.setattr(tap, "_selects", lambda reactor: True)
    service, _ = from_config(tmp_path, open_files=60)  # would not hold the 4 ports
    assert service.open_files is None
    assert {f.limits.max_connections for f in service.factories.values()} == {9000}


@pytest.mark.parametrize(
    ("listen", "where"),
    [
        # TOML doubles the backslashes that escape the colons.
        ("tcp:28701:interface=\\\\:\\\\:1", "[::1]:28701"),
        ("unix:{tmp}/admin.sock", "{tmp}/admin.sock"),
    ],
)
def test_the_admin_line_names_any_address(tmp_path: Path, listen: str, where: str) -> None:
    service, _ = from_config(
        tmp_path,
        GOOD.replace("tcp:28700:interface=127.0.0.1", listen.format(tmp=tmp_path))
        + '\n[admin.users]\nops = "pw"\n',
    )
    with capturedLogs() as events:
        service.privilegedStartService()
        service.startService()
    service.stopService()
    lines = [formatEvent(e) for e in events]
    assert f"admin API listening on {where.format(tmp=tmp_path)}" in lines


@pytest.mark.parametrize(
    ("ports", "spans"),
    [
        ([10201], "10201"),
        ([10203, 10201, 10202], "10201-10203"),
        ([1, 2, 4, 6, 7, 8, 10], "1-2,4,6-8,10"),
        ([], ""),
    ],
)
def test_port_spans(ports: list[int], spans: str) -> None:
    assert tap.port_spans(ports) == spans


def test_demo_service() -> None:
    reactor = MemoryReactorClock()
    opts = options("--demo", "--demo-ports", "30001-30002", "--demo-sandbox-port", "30000")
    service = tap.makeService(opts, reactor=reactor)
    service.privilegedStartService()
    service.startService()
    ports = {port: factory for port, factory, _, _ in reactor.tcpServers}
    assert set(ports) == {30000, 30001, 30002, 8700, 10199}
    assert isinstance(ports[30000], SandboxFactory)
    assert ports[30001].mapping.upstream.port == 30000
    service.stopService()


def test_the_demo_sandbox_serves_until_the_end_of_a_stop() -> None:
    """
    The sandbox is the demo ports' upstream and their release API: the
    grace (requests in flight may take a new upstream connection) and the
    vendor releases at the stop still need it, so it stops last.
    """
    reactor = MemoryReactorClock()
    opts = options("--demo", "--demo-ports", "30001-30002", "--demo-sandbox-port", "30000")
    service = tap.makeService(opts, reactor=reactor)
    service.privilegedStartService()
    service.startService()

    def listening() -> set[int]:
        return {
            listener.port
            for listener in service.listeners()
            if isinstance(listener, tap._TCPListener) and listener.listening is not None
        }

    assert listening() == {30000, 30001, 30002, 10199}
    graceful = Deferred.fromCoroutine(service.graceful_stop())
    assert graceful.called
    assert listening() == {30000, 10199}
    assert service.stopService().called
    assert listening() == set()


def test_demo_admin_port() -> None:
    """
    ``--demo-admin-port`` moves the demo's admin API (two demos, or a demo
    beside a proxymap on 8700, can run at once), and the banner says where.
    """
    reactor = MemoryReactorClock()
    opts = options("--demo", "--demo-ports", "30001", "--demo-admin-port", "30003")
    service = tap.makeService(opts, reactor=reactor)
    service.privilegedStartService()
    with capturedLogs() as events:
        service.startService()
    ports = {port: interface for port, _, _, interface in reactor.tcpServers}
    assert ports[30003] == "127.0.0.1" and 8700 not in ports
    said = [e["line"] for e in events if "line" in e]
    assert "  curl http://127.0.0.1:30003/sessions   # every session (admin API)" in said
    service.stopService()


@pytest.mark.parametrize(
    "argv",
    [[], ["--demo", "--config", "x.toml"], ["--demo-sandbox-port", "x", "--demo"]],
)
def test_usage_errors(argv: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        options(*argv)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """
    ``proxymap --version`` is proxymap's, not only Twisted's (what
    ``usage.Options`` would print).
    """
    with pytest.raises(SystemExit) as e:
        options("--version")
    assert e.value.code == 0
    build = proxymap.build_info()
    assert capsys.readouterr().out == (
        f"proxymap {build['version']} (Twisted {build['twisted']}, "
        f"{build['implementation']} {build['python']})\n"
    )


def test_bad_config_exits_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace("ports = [20010]", 'ports = [20010]\nlifetime = "soon"'))
    with pytest.raises(SystemExit) as e:
        options("--config", str(path))
    assert str(e.value) == (
        f"proxymap: {path}: mapping[1].lifetime: 'soon' is not a duration "
        "(use a number with a unit: ms, s, m, h, d)"
    )


@pytest.mark.parametrize("runner", ["twistd", "twist"])
def test_bad_config_on_the_command_line(tmp_path: Path, runner: str) -> None:
    """
    Through the real twistd and twist: one line on stderr, no traceback,
    exit status 1.
    """
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace('user = "alice"', 'user = "alice"\ncolour = "red"'))
    argv = [runner, "-n", "proxymap"] if runner == "twistd" else [runner, "proxymap"]
    result = subprocess.run(
        [*argv, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"proxymap: {path}: mapping[0].colour: unknown key"
    assert "Traceback" not in result.stdout + result.stderr


def test_check_report(tmp_path: Path) -> None:
    """
    ``--check`` says what start-up would log of the configuration: its
    warnings first, then a line a mapping and where the admin API listens.
    """
    path = tmp_path / "p.toml"
    path.write_text(GOOD)
    config = options("--config", str(path)).config
    mapping_lines = [
        "mapping a: 3 ports on 127.0.0.1:20001-20003, upstream http://127.0.0.1:9, "
        f"sessions last {config.mappings[0].lifetime:g}s",
        "mapping b: 1 port on [::1]:20010, upstream http://127.0.0.1:9, "
        f"sessions last {config.mappings[1].lifetime:g}s",
    ]
    open_admin = (
        "warning: the admin API on tcp:28700:interface=127.0.0.1 has no users: anyone on "
        "this host can use it (add [admin.users] to require credentials)"
    )
    admin = "admin API on tcp:28700:interface=127.0.0.1"
    assert tap.check_report(config, (100_000, 2)) == [open_admin, *mapping_lines, admin]
    # A limit that holds 4 ports and 10 connections: the warning start-up logs.
    (fitted, *rest) = tap.check_report(config, (4 + 64 + 20, 2))
    assert fitted.startswith(
        "warning: the open-file limit (88) holds 4 ports and 10 connections, "
        "not max_connections = 9000"
    )
    assert rest == [open_admin, *mapping_lines, admin]
    # The demo's limits are not the user's (see makeService); select keeps its limit.
    assert tap.check_report(config, (88, 2), demo=True)[0] == open_admin
    assert tap.check_report(config, None)[0] == open_admin
    with pytest.raises(tap.TooFewOpenFiles):
        tap.check_report(config, (60, 2))

    path.write_text(GOOD + '[admin.users]\nops = "hunter2"\n')
    assert tap.check_report(options("--config", str(path)).config, None) == [
        *mapping_lines,
        admin,
    ]
    path.write_text(GOOD.replace('"tcp:28700:interface=127.0.0.1"', '""'))
    assert tap.check_report(options("--config", str(path)).config, None) == [
        *mapping_lines,
        "admin API off",
    ]


def check(
    path: Path, *argv: str, open_files: int | None = None
) -> subprocess.CompletedProcess[str]:
    """
    ``argv`` (twistd or twist) with ``proxymap --config path --check``, to
    its end; ``open_files`` is the hard open-file limit it runs under.
    """
    limit = [] if open_files is None else with_open_files(open_files, open_files)
    return subprocess.run(
        [*limit, *argv, "proxymap", "--config", str(path), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
        check=False,
    )


@pytest.mark.parametrize("runner", [["twistd"], ["twistd", "-n"], ["twist"]])
def test_check_on_the_command_line(tmp_path: Path, runner: list[str]) -> None:
    """
    Through the real runners, daemonising twistd included: a good file
    prints its report on stdout and exits 0 without listening, writing a
    pid file or a log, or printing a secret; a bad file is one line on
    stderr and status 1, as at start-up.
    """
    path = tmp_path / "p.toml"
    path.write_text(GOOD + '[admin.users]\nops = "hunter2"\n')
    result = check(path, *runner)
    pid_file = tmp_path / "twistd.pid"
    if pid_file.exists():  # it daemonised: stop it before failing
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        "mapping a: 3 ports on 127.0.0.1:20001-20003, upstream http://127.0.0.1:9, "
        "sessions last 600s",
        "mapping b: 1 port on [::1]:20010, upstream http://127.0.0.1:9, sessions last 600s",
        "admin API on tcp:28700:interface=127.0.0.1",
        f"proxymap: {path}: configuration OK",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.toml"]
    assert "s3cret" not in result.stdout and "hunter2" not in result.stdout

    path.write_text(GOOD.replace('user = "alice"', 'user = "alice"\ncolour = "red"'))
    result = check(path, *runner)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.strip() == f"proxymap: {path}: mapping[0].colour: unknown key"


def test_check_fits_the_open_file_limit(tmp_path: Path) -> None:
    """
    ``--check`` raises its limit as start-up does, and fails as start-up
    would when even the hard limit cannot hold the ports (GOOD maps 4).
    """
    path = tmp_path / "p.toml"
    path.write_text(GOOD)
    result = check(path, "twist", open_files=60)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.strip().startswith(
        f"proxymap: {path}: the open-file limit (60) cannot hold 4 ports"
    )
    result = check(path, "twist", open_files=88)
    assert result.returncode == 0
    assert result.stdout.startswith(
        "warning: the open-file limit (88) holds 4 ports and 10 connections"
    )


def start_up(path: Path) -> subprocess.CompletedProcess[str]:
    """
    ``python -m twisted proxymap --config path`` to its end (start-up is
    expected to fail).
    """
    return subprocess.run(
        [sys.executable, "-m", "twisted", "proxymap", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
        check=False,
    )


def test_port_in_use_fails_start_up_naming_it(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "p.toml"
        path.write_text(f'[[mapping]]\nports = {port}\nupstream = "http://127.0.0.1:9"\n')
        result = start_up(path)
    assert result.returncode == 1
    assert f"proxymap: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_an_admin_api_that_cannot_listen_fails_start_up_naming_it(
    tmp_path: Path, where: str
) -> None:
    """
    A UNIX socket in a directory that is not there, or a TCP port in use:
    one line naming the endpoint and its key, not a traceback.
    """
    import socket

    with socket.socket() as busy, socket.socket() as free:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        free.bind(("127.0.0.1", 0))
        mapped = free.getsockname()[1]
        free.close()
        if where == "unix":
            listen = f"unix:{tmp_path / 'missing' / 'admin.sock'}"
            why = "No such file or directory"
        else:
            listen = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
            why = "Address already in use"
        path = tmp_path / "p.toml"
        path.write_text(
            f'[[mapping]]\nports = {mapped}\nupstream = "http://127.0.0.1:9"\n'
            f'[admin]\nlisten = "{listen}"\n'
        )
        result = start_up(path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"proxymap: cannot listen on {listen} (admin.listen): {why}"
    assert "Traceback" not in result.stdout


class HeldAddresses(MemoryReactorClock):
    """
    A memory reactor whose listening ports hold their address until they
    close, a reactor turn after ``stopListening`` as Twisted's TCP ports do;
    binding an address held (or overlapping one: a wildcard and any address
    of its family) fails, as does binding an address in ``foreign``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[tuple[str, int], object] = {}
        self.foreign: set[str] = set()

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        def overlaps(a: str, b: str) -> bool:
            wildcard = {"0.0.0.0", ""} if ":" not in a + b else {"::"}
            return a == b or a in wildcard or b in wildcard

        if interface in self.foreign:
            raise CannotListenError(interface, port, OSError(99, "Cannot assign requested address"))
        if any(p == port and overlaps(i, interface) for i, p in self.held):
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        super().listenTCP(port, factory, backlog, interface)
        self.held[(interface, port)] = factory
        return HeldPort(self, (interface, port))


@attrs.define
class HeldPort:
    reactor: HeldAddresses
    address: tuple[str, int]

    def stopListening(self) -> Deferred[None]:
        return deferLater(self.reactor, 0, lambda: self.reactor.held.pop(self.address) and None)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", *self.address)


@attrs.define
class Told:
    """
    A notifier keeping what it would tell systemd.
    """

    messages: list[str]

    def notify(self, message: str) -> None:
        self.messages.append(message)


def started(tmp_path: Path, text: str) -> tuple[tap.ProxymapService, HeldAddresses]:
    path = tmp_path / "proxymap.toml"
    path.write_text(text)
    reactor = HeldAddresses()
    service = tap.makeService(
        options("--config", str(path)), reactor=reactor, open_files=lambda: 100_000
    )
    service.privilegedStartService()
    service.startService()
    return service, reactor


def test_a_reload_moves_ports_whose_bind_changed(tmp_path: Path) -> None:
    """
    A mapping's new bind: its ports close where they listened and listen
    there (once the old sockets have closed: 0.0.0.0 overlaps 127.0.0.1),
    with the same factory, so the same session and open connections; the
    admin API shows where they listen; READY waits for them.
    """
    service, reactor = started(tmp_path, GOOD)
    factory = service.factories[20001]
    session = service.registry.current(20001)
    moved = GOOD.replace('ports = "20001-20003"', 'ports = "20001-20003"\nbind = "0.0.0.0"')
    moved = moved.replace('pass = "s3cret"', 'pass = "s3cret"\nopen_proxy = true')
    (tmp_path / "proxymap.toml").write_text(moved)
    told: list[str] = []
    service.notifier = Told(told)  # type: ignore[assignment]
    with capturedLogs() as events:
        service.reload()
        assert told == ["RELOADING=1"]  # the old sockets close a turn later
        reactor.advance(0)
    assert told == ["RELOADING=1", "READY=1"]
    assert set(reactor.held) == {
        ("0.0.0.0", 20001), ("0.0.0.0", 20002), ("0.0.0.0", 20003), ("::1", 20010),
        ("127.0.0.1", 28700),
    }  # fmt: skip
    assert service.factories[20001] is factory and factory.bind == "0.0.0.0"
    assert reactor.held[("0.0.0.0", 20001)] is factory
    assert service.registry.peek(20001) is session
    said = [formatEvent(e) for e in events if formatEvent(e).startswith("reloaded:")]
    assert said == [
        "reloaded: 0 ports added, 0 removed, 0 sessions renewed, "
        "3 moved to another address (20001-20003)"
    ]
    assert port_view(factory, session)["bind"] == "0.0.0.0"  # what the admin API shows


def test_a_port_that_cannot_move_stays_where_it_was(tmp_path: Path) -> None:
    service, reactor = started(tmp_path, GOOD)
    reactor.foreign.add("192.0.2.1")
    moved = GOOD.replace('bind = "::1"', 'bind = "192.0.2.1"\nopen_proxy = true')
    (tmp_path / "proxymap.toml").write_text(moved)
    with capturedLogs() as events:
        service.reload()
        reactor.advance(0)
    assert ("::1", 20010) in reactor.held
    assert service.factories[20010].bind == "::1"
    errors = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
    assert errors == [
        "reload: cannot listen on 192.0.2.1:20010: [Errno 99] Cannot assign requested address; "
        "it stays on [::1]"
    ]
    ok, details = service.health()
    assert ok and details["listening"] == details["listeners"]


def test_a_second_move_before_the_first_is_done_wins(tmp_path: Path) -> None:
    """
    Two reloads in one reactor turn (two quick SIGHUPs): the port ends
    where the second put it, and listens once.
    """
    service, reactor = started(tmp_path, GOOD)
    config = tmp_path / "proxymap.toml"
    for bind in ("127.0.0.2", "127.0.0.3"):
        config.write_text(GOOD.replace('pass = "s3cret"', f'pass = "s3cret"\nbind = "{bind}"'))
        service.reload()
    reactor.advance(0)
    assert [a for a in reactor.held if a[1] == 20001] == [("127.0.0.3", 20001)]
    assert service.factories[20001].bind == "127.0.0.3"
