"""
Operations in memory: the state file on a Clock, and sd_notify with a
datagram socket standing in for systemd.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from proxymap.config import parse_config
from proxymap.ops.notify import Notifier
from proxymap.ops.state import StateFile, fingerprint
from proxymap.sessions import PortPolicy, SessionRegistry, spelled_as
from proxymap.tap import build_service

from .helpers import FUZZ_EXAMPLES, counting_ids, mapping


def registry(clock: Clock, **overrides: Any) -> SessionRegistry:
    reg = SessionRegistry(clock=clock, new_id=counting_ids())
    # Ids spelled so that counting_ids()'s (sess0001, ...) are the mapping's.
    overrides.setdefault("session_id", {"alphabet": "a-z0-9"})
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


def test_a_late_write_never_replaces_newer_content(tmp_path: Path) -> None:
    """
    Writes run in threads; the one at shutdown runs at once.  A write that
    comes late (still queued, or slow to the disk) leaves the newer file
    alone.
    """
    clock = Clock()
    reg = registry(clock)
    path = tmp_path / "sessions.json"
    queued: list[Any] = []
    state = StateFile(path, reg, clock, run_write=queued.append)
    reg.subscribe(state)
    reg.current(10201)
    clock.advance(1)
    assert len(queued) == 1  # the thread has not run it yet
    reg.current(10202)
    state.save_now()  # shutting down
    queued.pop()()
    assert [s["port"] for s in json.loads(path.read_text())["sessions"]] == [10201, 10202]
    assert state.writes == 1


def test_writes_in_threads_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Every write goes through one temporary file, so one write must not
    start while another is between opening it and renaming it.
    """
    clock = Clock()
    reg = registry(clock)
    path = tmp_path / "sessions.json"
    state = StateFile(path, reg, clock)
    reg.current(10201)
    syncing, go_on = threading.Event(), threading.Event()
    sync = os.fsync

    def slow_first_fsync(fd: int) -> None:
        if not syncing.is_set():
            syncing.set()
            assert go_on.wait(10)
        sync(fd)

    monkeypatch.setattr("proxymap.ops.state.os.fsync", slow_first_fsync)
    first = threading.Thread(target=state.save_now)
    first.start()
    assert syncing.wait(10)
    reg.current(10202)
    second = threading.Thread(target=state.save_now)
    with capturedLogs() as events:
        second.start()
        second.join(0.2)  # it waits for the first, or (before) overwrote its file
        go_on.set()
        first.join(10)
        second.join(10)
    assert not first.is_alive() and not second.is_alive()
    assert [e for e in events if e["log_level"] == LogLevel.warn] == []
    assert [s["port"] for s in json.loads(path.read_text())["sessions"]] == [10201, 10202]
    assert state.writes == 2
    assert not list(tmp_path.glob("*.tmp"))


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


def saved_file(tmp_path: Path, clock: Clock, **changes: Any) -> Path:
    """
    A state file holding port 10201's live session, with ``changes`` made to
    its entry (a value of ``...`` removes the field).
    """
    path = tmp_path / "sessions.json"
    before = registry(clock, session_params={"country": "us"})
    before.current(10201)
    StateFile(path, before, clock).save_now()
    data = json.loads(path.read_text())
    entry = data["sessions"][0]
    for name, value in changes.items():
        if value is ...:
            entry.pop(name, None)
        else:
            entry[name] = value
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "changes, why",
    [
        ({"port": 1e400}, "port inf is not a port number"),
        ({"port": True}, "port True is not a port number"),
        ({"port": "10201"}, "port '10201' is not a port number"),
        ({"port": ...}, "port None is not a port number"),
        ({"id": "sess\r\nX-Evil: 1"}, "port 10201: id 'sess\\r\\nX-Evil: 1' is not spelled"),
        ({"id": None}, "port 10201: id None is not spelled"),
        ({"id": "sess001"}, "port 10201: id 'sess001' is not spelled"),
        ({"id": "SESS0001"}, "port 10201: id 'SESS0001' is not spelled"),
        ({"expires": 1e300}, "port 10201: created 1000.0 and expires 1e+300 are not times"),
        ({"expires": float("nan")}, "port 10201: created 1000.0 and expires nan are not"),
        ({"expires": "1600"}, "port 10201: created 1000.0 and expires '1600' are not"),
        ({"created": 900.0}, "port 10201: created 900.0 and expires 1600.0 are not"),
        ({"created": 4600.0, "expires": 5200.0}, "created 4600.0 and expires 5200.0 are not"),
        ({"params": {"country": None}}, "port 10201: params {'country': None} are not"),
        ({"params": {"country": "u s"}}, "country: use at most 64 letters"),
        ({"params": {"city": "paris"}}, "city: not a session parameter here"),
        ({"params": ["country"]}, "port 10201: params ['country'] are not names and strings"),
    ],
)
def test_a_session_the_registry_could_not_have_made_is_not_restored(
    tmp_path: Path, changes: dict[str, Any], why: str
) -> None:
    """
    A saved session is restored only as the registry could have made it:
    its id goes into headers and credentials, its times into a timer and
    dates.  Anything else is skipped with a warning saying why, and the
    rest of the file is still read.
    """
    clock = Clock()
    clock.advance(1000)
    path = saved_file(tmp_path, clock, **changes)
    data = json.loads(path.read_text())
    good = registry(clock, session_params={"country": "us"})
    good.current(10202)
    other = tmp_path / "other.json"
    StateFile(other, good, clock).save_now()
    data["sessions"] += json.loads(other.read_text())["sessions"]
    path.write_text(json.dumps(data))
    clock.advance(600 - 1)  # 1 s left of the saved session's lifetime (10m)
    after = registry(clock, session_params={"country": "us"})
    with capturedLogs() as events:
        restored = StateFile(path, after, clock).restore()
    assert restored == 1
    assert [s.port for s in after.list()] == [10202]
    warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1 and why in warnings[0], warnings


@pytest.mark.parametrize("entry", [5, None, "10201", [10201]])
def test_a_saved_session_that_is_not_an_object_is_skipped(tmp_path: Path, entry: Any) -> None:
    path = tmp_path / "sessions.json"
    path.write_text(json.dumps({"version": 1, "sessions": [entry]}))
    reg = registry(Clock())
    with capturedLogs() as events:
        assert StateFile(path, reg, Clock()).restore() == 0
    assert [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn] == [
        f"skipping a saved session (not an object: {entry!r})"
    ]


def test_a_saved_session_of_a_port_no_longer_mapped_is_dropped_quietly(tmp_path: Path) -> None:
    clock = Clock()
    path = saved_file(tmp_path, clock, port=10299)
    with capturedLogs() as events:
        assert StateFile(path, registry(clock), clock).restore() == 0
    assert [e for e in events if e["log_level"] == LogLevel.warn] == []


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["port", "id", "created", "expires", "params", "fingerprint", "extra"]),
        _JSON | st.just(...),
        max_size=3,
    )
)
def test_any_saved_session_is_restored_as_made_or_skipped(changes: dict[str, Any]) -> None:
    """
    Whatever a saved entry holds, restoring neither raises nor brings back
    a session the registry could not have made.
    """
    clock = Clock()
    clock.advance(1000)
    with tempfile.TemporaryDirectory() as tmp:
        path = saved_file(Path(tmp), clock, **changes)
        clock.advance(10)
        after = registry(clock, session_params={"country": "us"})
        with capturedLogs():
            restored = StateFile(path, after, clock).restore()
    assert restored == len(after.list())
    for session in after.list():
        assert spelled_as(after.policy(session.port).mapping.session_id, session.id)
        assert session.created <= session.expires <= session.created + 600
        assert clock.seconds() < session.expires <= clock.seconds() + 600
        assert all(isinstance(v, str) for v in session.params.values())


def test_unreadable_state_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "sessions.json"
    path.mkdir()  # reading a directory fails
    assert StateFile(path, registry(Clock()), Clock()).restore() == 0


def test_a_state_file_that_cannot_be_written_is_a_warning(tmp_path: Path) -> None:
    """
    A state file whose directory cannot be made (here a file stands in its
    way; in life a full disk or a read-only mount) costs the next restart
    its sessions, not the running process: a warning naming the path and
    the reason, and the next change tries again.
    """
    clock = Clock()
    reg = registry(clock)
    (tmp_path / "blocked").write_text("a file, not a directory")
    path = tmp_path / "blocked" / "sessions.json"
    state = StateFile(path, reg, clock)
    reg.subscribe(state)
    with capturedLogs() as events:
        reg.current(10201)
        clock.advance(1)
        reg.renew(10201)
        clock.advance(1)
    warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert warnings == [f"cannot write the state file {path} (File exists)"] * 2
    assert state.writes == 0
    assert reg.peek(10201) is not None


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
