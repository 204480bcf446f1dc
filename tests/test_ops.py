"""
Operations in memory: the state file on a Clock, and sd_notify with a
datagram socket standing in for systemd.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from proxymap.config import parse_config
from proxymap.ops.notify import Notifier
from proxymap.ops.state import StateFile, fingerprint
from proxymap.sessions import PortPolicy, SessionRegistry
from proxymap.tap import build_service

from .helpers import counting_ids, mapping


def registry(clock: Clock, **overrides: Any) -> SessionRegistry:
    reg = SessionRegistry(clock=clock, new_id=counting_ids())
    m = mapping(**overrides)
    for port in m.ports:
        reg.add_port(port, PortPolicy(m))
    return reg


def test_saved_debounced_and_atomically(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(1000)
    reg = registry(
        clock,
        session_params={"country": ""},
        username="{user}[-country-{country}]-session-{session}",
    )
    path = tmp_path / "state" / "sessions.json"
    state = StateFile(path, reg, clock)
    reg.subscribe(state)
    reg.current(10201)
    reg.renew(10202, {"country": "de"})
    assert not path.exists()  # not yet: changes are gathered for a moment
    clock.advance(1)
    assert state.writes == 1
    data = json.loads(path.read_text())
    assert [(s["port"], s["id"], s["params"]) for s in data["sessions"]] == [
        (10201, "sess0001", {"country": ""}),
        (10202, "sess0002", {"country": "de"}),
    ]
    assert not list(path.parent.glob("*.tmp"))
    assert "s3cret" not in path.read_text()


def test_restart_restores_live_unchanged_sessions(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(1000)
    path = tmp_path / "sessions.json"
    before = registry(clock)
    state = StateFile(path, before, clock)
    a = before.current(10201)
    b = before.current(10202)
    state.save_now()

    clock.advance(300)
    after = registry(clock)
    assert StateFile(path, after, clock).restore() == 2
    again = after.peek(10201)
    assert again is not None and (again.id, again.created, again.expires) == (
        a.id,
        a.created,
        a.expires,
    )
    assert again.authorization == a.authorization
    assert after.peek(10202).id == b.id
    clock.advance(300)  # the original expiry still holds
    assert after.peek(10201) is None


def test_expired_or_changed_mappings_are_not_restored(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "sessions.json"
    before = registry(clock, lifetime="10m")
    before.current(10201)
    StateFile(path, before, clock).save_now()
    changed = registry(clock, username="{user}-sid-{session}")
    assert StateFile(path, changed, clock).restore() == 0
    clock.advance(600)
    expired = registry(clock)
    assert StateFile(path, expired, clock).restore() == 0
    assert fingerprint(mapping()) != fingerprint(mapping(username="{user}-sid-{session}"))
    assert fingerprint(mapping()) == fingerprint(mapping(**{"pass": "another"}))


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"version": 9, "sessions": []}',
        '{"version": 1}',
        '{"version": 1, "sessions": [{"x": 1}]}',
    ],
)
def test_corrupt_state_file_is_ignored(tmp_path: Path, content: str) -> None:
    path = tmp_path / "sessions.json"
    path.write_text(content)
    reg = registry(Clock())
    assert StateFile(path, reg, Clock()).restore() == 0
    assert reg.list() == []


def test_unreadable_state_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "sessions.json"
    path.mkdir()  # reading a directory fails
    assert StateFile(path, registry(Clock()), Clock()).restore() == 0


@pytest.fixture
def systemd(tmp_path: Path) -> Any:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def test_notifier(systemd: Any) -> None:
    sock, path = systemd
    Notifier(path).notify("READY=1")
    assert sock.recv(100) == b"READY=1"
    Notifier("").notify("READY=1")  # not under systemd: nothing, no error
    Notifier("/nonexistent/socket").notify("READY=1")  # logged, not raised


def test_abstract_socket() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0proxymap-test-notify")
    sock.settimeout(2)
    try:
        Notifier("@proxymap-test-notify").notify("STOPPING=1")
        assert sock.recv(100) == b"STOPPING=1"
    finally:
        sock.close()


def test_service_notifies_ready_and_stopping(systemd: Any, monkeypatch: Any) -> None:
    sock, path = systemd
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    config = parse_config({"mapping": [{"ports": "20001-20002", "upstream": "http://h:1"}]}, env={})
    reactor = MemoryReactorClock()
    service = build_service(config, reactor)
    service.privilegedStartService()
    service.startService()
    assert len(reactor.tcpServers) == 3  # both ports and the admin API first...
    assert sock.recv(100) == b"READY=1"  # ...then READY
    service.stopService()
    assert sock.recv(100) == b"STOPPING=1"
