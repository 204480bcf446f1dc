"""
Vendor-side release on a Clock, with StubTreq standing in for the network
and the sandbox's release API (or a scripted resource) as the vendor.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from proxymap import tap
from proxymap.config import ConfigError, parse_config
from proxymap.sandbox.release_api import ReleaseAPI
from proxymap.sandbox.vendor import SandboxVendor
from proxymap.sessions import EndReason, PortPolicy, SessionRegistry
from proxymap.vendors.release import VendorRelease

from .helpers import counting_ids

RELEASE = {"user": "api", "pass": "api-secret"}


def mapping(ports: str = "10201-10202", **release: Any) -> Any:
    raw = {
        "name": "geo",
        "ports": ports,
        "upstream": "http://gw.example:10000",
        "user": "alice",
        "pass": "pw",
        "preset": "geonode",
        "lifetime": "10m",
        "release": {**RELEASE, **release},
    }
    return parse_config({"mapping": [raw]}, env={}).mappings[0]


class Setup:
    def __init__(self, resource: Resource, ports: str = "10201-10202", **release: Any) -> None:
        self.clock = Clock()
        self.mapping = mapping(ports, **release)
        self.registry = SessionRegistry(clock=self.clock, new_id=counting_ids())
        for port in self.mapping.ports:
            self.registry.add_port(port, PortPolicy(self.mapping))
        self.treq = StubTreq(resource)
        self.release = VendorRelease(
            clock=self.clock,
            client=self.treq,
            mapping="geo",
            config=self.mapping.release,
            upstream=("gw.example", 10000),
            params=dict(self.mapping.params),
        )
        self.registry.subscribe(self.release)


class Scripted(Resource):
    """
    Answers each call with the next status of a script; None never answers.
    """

    isLeaf = True

    def __init__(self, statuses: list[int | None]) -> None:
        super().__init__()
        self.statuses = statuses
        self.calls = 0

    def render(self, request: Any) -> Any:
        status = self.statuses[min(self.calls, len(self.statuses) - 1)]
        self.calls += 1
        if status is None:
            return NOT_DONE_YET
        request.setResponseCode(status)
        return json.dumps({"success": status == 200}).encode()


def test_geonode_request_exactly() -> None:
    """
    A reset sends Geonode's release call: PUT to the service type's path,
    Basic auth with the API credentials, the vendor's port and session id.
    """
    vendor = SandboxVendor(api_user="api", api_password="api-secret")
    vendor.exit_for("sess0001")
    s = Setup(ReleaseAPI(vendor), url="http://vendor.test/sessions/release/{service_type}")
    s.registry.current(10201)
    s.registry.reset(10201)
    assert vendor.release_calls == []  # batched for a moment
    s.clock.advance(0.2)
    s.treq.flush()
    assert vendor.release_calls == [
        {
            "method": "PUT",
            "path": "/sessions/release/RESIDENTIAL-PREMIUM",
            "user": "api",
            "body": {"data": [{"port": 10000, "sessionId": "sess0001"}]},
        }
    ]
    assert "sess0001" not in vendor.exits  # the sandbox gave the id up
    assert (s.release.succeeded, s.release.failed) == (1, 0)


def test_default_url_is_geonodes() -> None:
    assert mapping().release.url == "https://monitor.geonode.com/sessions/release/{service_type}"
    assert mapping().release.method == "PUT"


def test_ends_close_together_are_batched() -> None:
    vendor = SandboxVendor()
    s = Setup(ReleaseAPI(vendor))
    vendor.api_user, vendor.api_password = "api", "api-secret"
    a, b = s.registry.current(10201), s.registry.current(10202)
    s.registry.renew(10201)
    s.registry.close(b.id, EndReason.RELEASED)
    s.clock.advance(0.2)
    s.treq.flush()
    ((call,),) = [vendor.release_calls]
    assert call["body"]["data"] == [
        {"port": 10000, "sessionId": a.id},
        {"port": 10000, "sessionId": b.id},
    ]


def test_no_call_on_natural_expiry_by_default() -> None:
    resource = Scripted([200])
    s = Setup(resource)
    s.registry.current(10201)
    s.clock.advance(600)
    s.clock.advance(1)
    s.treq.flush()
    assert resource.calls == 0


def test_expiry_when_configured() -> None:
    resource = Scripted([200])
    s = Setup(resource, on=["expired"])
    s.registry.current(10201)
    s.clock.advance(600)
    s.clock.advance(0.2)
    s.treq.flush()
    assert resource.calls == 1
    s.registry.reset(10201)  # not in "on" any more
    s.clock.advance(1)
    s.treq.flush()
    assert resource.calls == 1


def test_retries_on_500_with_backoff() -> None:
    resource = Scripted([500, 500, 200])
    s = Setup(resource, backoff="1s", batch="250ms")
    s.registry.current(10201)
    s.registry.reset(10201)
    s.clock.advance(0.25)
    s.treq.flush()
    assert resource.calls == 1
    s.clock.advance(1)
    s.treq.flush()
    assert resource.calls == 2
    s.clock.advance(1.75)
    s.treq.flush()
    assert resource.calls == 2  # the second wait is twice as long
    s.clock.advance(0.25)
    s.treq.flush()
    assert resource.calls == 3
    assert (s.release.succeeded, s.release.retried, s.release.failed) == (1, 2, 0)


def test_retries_on_timeout() -> None:
    resource = Scripted([None, 200])
    s = Setup(resource, timeout="5s", backoff="1s")
    s.registry.current(10201)
    s.registry.reset(10201)
    s.clock.advance(0.2)
    s.treq.flush()
    assert resource.calls == 1 and s.release.pending
    s.clock.advance(5)  # the call times out
    s.clock.advance(1)  # backoff
    s.treq.flush()
    assert resource.calls == 2
    assert (s.release.succeeded, s.release.retried) == (1, 1)
    assert not s.release.pending


def test_gives_up_logs_and_counts_without_credentials() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        resource = Scripted([503])
        s = Setup(resource, retries=2, backoff="1s")
        s.registry.current(10201)
        s.registry.reset(10201)
        s.clock.advance(0.2)
        for _ in range(4):
            s.treq.flush()
            s.clock.advance(4)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert resource.calls == 3
    assert (s.release.succeeded, s.release.failed) == (0, 1)
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1 and warnings[0]["problem"] == "HTTP 503"
    text = json.dumps([{k: str(v) for k, v in e.items()} for e in events])
    assert "api-secret" not in text
    assert base64.b64encode(b"api:api-secret").decode() not in text


@pytest.mark.parametrize(
    ("status", "calls", "said"),
    [
        (400, 1, "failed after 1 attempt (HTTP 400)"),
        (401, 1, "failed after 1 attempt (HTTP 401)"),
        (404, 1, "failed after 1 attempt (HTTP 404)"),
        (429, 3, "failed after 3 attempts (HTTP 429)"),
        (408, 3, "failed after 3 attempts (HTTP 408)"),
    ],
)
def test_a_client_error_is_not_retried(status: int, calls: int, said: str) -> None:
    """
    A 4xx answer says the call itself is wrong (its credentials, URL or
    body), and a retry would be as wrong, so it ends the call; but for a
    timeout, too early or too many requests, which another attempt may
    pass.
    """
    resource = Scripted([status])
    s = Setup(resource, retries=2, backoff="1s")
    s.registry.current(10201)
    with capturedLogs() as events:
        s.registry.reset(10201)
        s.clock.advance(0.2)
        for _ in range(4):
            s.treq.flush()
            s.clock.advance(4)
    assert resource.calls == calls
    assert (s.release.succeeded, s.release.failed, s.release.retried) == (0, 1, calls - 1)
    warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1 and warnings[0].endswith(said), warnings


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (b'{"success": false}', (0, 1)),
        (b"", (1, 0)),
        (b"released", (1, 0)),
        (b'{"success": true}', (1, 0)),
        (b'["success", false]', (1, 0)),
    ],
)
def test_a_2xx_succeeds_unless_its_json_says_no(answer: bytes, outcome: tuple[int, int]) -> None:
    """
    Vendors answer a release with JSON, text or nothing: only a JSON object
    saying ``"success": false`` turns a 2xx into a failure.
    """

    class Answer(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            request.setResponseCode(204 if not answer else 200)
            return answer

    s = Setup(Answer(), retries=0)
    s.registry.current(10201)
    s.registry.reset(10201)
    s.clock.advance(0.2)
    s.treq.flush()
    assert (s.release.succeeded, s.release.failed) == outcome


def test_per_session_url_sends_one_call_each() -> None:
    class Recorder(Resource):
        isLeaf = True

        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[bytes, bytes]] = []

        def render(self, request: Any) -> bytes:
            self.calls.append((request.method, request.path))
            return b"{}"

    resource = Recorder()
    s = Setup(
        resource,
        method="DELETE",
        url="https://api.vendor.test/sessions/{session}",
        body="",
        entry="",
    )
    a, b = s.registry.current(10201), s.registry.current(10202)
    s.registry.reset(10201)
    s.registry.reset(10202)
    s.treq.flush()
    assert resource.calls == [
        (b"DELETE", f"/sessions/{a.id}".encode()),
        (b"DELETE", f"/sessions/{b.id}".encode()),
    ]


class Held(Resource):
    """
    Holds every call until the test answers it.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []

    def render(self, request: Any) -> Any:
        self.held.append(request)
        return NOT_DONE_YET

    def answer(self) -> bytes:
        request = self.held.pop(0)
        path: bytes = request.path
        request.write(b'{"success": true}')
        request.finish()
        return path


def test_calls_wait_their_turn() -> None:
    """
    Releasing 10 sessions one call each opens at most MAX_CALLS calls at
    once; each answer lets the next call go, until all are made.
    """
    from proxymap.vendors.release import MAX_CALLS

    resource = Held()
    s = Setup(
        resource,
        "10201-10210",
        method="DELETE",
        url="https://api.vendor.test/sessions/{session}",
        body="",
        entry="",
    )
    ids = [s.registry.current(port).id for port in s.mapping.ports]
    for port in s.mapping.ports:
        s.registry.reset(port)
    s.treq.flush()
    assert len(resource.held) == MAX_CALLS == 4
    answered = []
    for _ in range(10):
        answered.append(resource.answer())
        s.treq.flush()
        assert len(resource.held) <= MAX_CALLS
    assert answered == [f"/sessions/{i}".encode() for i in ids]
    assert (s.release.succeeded, s.release.pending) == (10, [])


def test_stop_cancels_calls_waiting_their_turn() -> None:
    resource = Held()
    s = Setup(resource, "10201-10210", url="https://x.test/{session}", body="", entry="")
    for port in s.mapping.ports:
        s.registry.current(port)
        s.registry.reset(port)
    s.treq.flush()
    assert (len(resource.held), len(s.release.pending)) == (4, 10)
    s.release.stop()
    s.treq.flush()
    assert len(resource.held) == 4  # no waiting call started as the others were cancelled
    assert not s.release.pending
    assert s.clock.getDelayedCalls() == []


def test_stop_cancels_queued_and_running_calls() -> None:
    resource = Scripted([None])
    s = Setup(resource)
    s.registry.current(10201)
    s.registry.reset(10201)
    s.clock.advance(0.2)
    s.treq.flush()
    assert s.release.pending
    s.release.stop()
    assert not s.release.pending
    assert s.clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("release", "message"),
    [
        ({"user": ""}, "mapping[0].release.user: the release API needs its own user and pass"),
        ({"url": "ftp://x"}, "mapping[0].release.url: expected an http:// or https:// URL"),
        ({"url": "https://x/{nope}"}, "mapping[0].release.url: unknown placeholder {nope}"),
        ({"body": "{entries"}, "mapping[0].release.body: does not render to JSON"),
        ({"entry": "{port"}, "mapping[0].release.entry: does not render to JSON"),
        ({"on": ["sometimes"]}, "mapping[0].release.on: expected a list of: closed, expired"),
        ({"on": [["closed"]]}, "mapping[0].release.on: expected a list of: closed, expired"),
        ({"retries": 99}, "mapping[0].release.retries: must be between 0 and 10"),
        ({"colour": "red"}, "mapping[0].release.colour: unknown key"),
        ({"method": "connect"}, "mapping[0].release.method: unsupported method 'CONNECT'"),
    ],
)
def test_config_errors(release: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        mapping(**release)
    assert str(e.value).startswith(message), str(e.value)


def test_no_preset_needs_a_url() -> None:
    raw = {"ports": "1", "upstream": "http://h:1", "release": {**RELEASE}}
    with pytest.raises(ConfigError, match=r"release\.url: expected an http"):
        parse_config({"mapping": [raw]}, env={})


@pytest.mark.parametrize(
    "end",
    [
        lambda reg, s: reg.reset(10201),
        lambda reg, s: reg.renew(10201),
        lambda reg, s: reg.close(s.id, EndReason.CLOSED),
        lambda reg, s: reg.close(s.id, EndReason.RELEASED),
    ],
    ids=["reset", "renewed", "closed", "released"],
)
def test_each_way_of_ending_sends_the_same_exact_request(end: Any) -> None:
    vendor = SandboxVendor(api_user="api", api_password="api-secret")
    s = Setup(ReleaseAPI(vendor), url="http://vendor.test/sessions/release/{service_type}")
    session = s.registry.current(10201)
    end(s.registry, session)
    s.clock.advance(0.2)
    s.treq.flush()
    assert vendor.release_calls == [
        {
            "method": "PUT",
            "path": "/sessions/release/RESIDENTIAL-PREMIUM",
            "user": "api",
            "body": {"data": [{"port": 10000, "sessionId": session.id}]},
        }
    ]


# ------------------------------------------------------------ reloads

RELOADED = """
{service}
[[mapping]]
name = "{name}"
ports = "{ports}"
upstream = "http://127.0.0.1:9"
user = "{user}"
pass = "pw"

[mapping.release]
url = "http://vendor.example/{path}"
user = "{api}"
pass = "k"
body = '{{"data": {{entries}}}}'
entry = '{{"sessionId": {{session}}}}'
{release}
"""


class Vendor(Resource):
    """
    A release API recording each call (its path, API user and ids) and
    answering each with the next status of a script (200 once it ends).
    """

    isLeaf = True

    def __init__(self, statuses: tuple[int | None, ...] = ()) -> None:
        super().__init__()
        self.statuses = list(statuses)
        self.calls: list[tuple[str, str, list[str]]] = []

    def render(self, request: Any) -> Any:
        user = base64.b64decode(request.getHeader("authorization").split()[1]).split(b":")[0]
        ids = [entry["sessionId"] for entry in json.loads(request.content.read())["data"]]
        self.calls.append((request.path.decode(), user.decode(), ids))
        status = self.statuses.pop(0) if self.statuses else 200
        if status is None:  # never answers
            return NOT_DONE_YET
        request.setResponseCode(status)
        return b"{}"


class Reloading:
    """
    A service built by the tap from a file, on a memory reactor, its
    release calls going to ``vendor``.
    """

    def __init__(self, tmp_path: Any, monkeypatch: Any, vendor: Vendor, **changes: str) -> None:
        monkeypatch.setattr(tap, "release_client", lambda reactor: StubTreq(vendor))
        self.path = tmp_path / "proxymap.toml"
        self.write(**changes)
        self.reactor = MemoryReactorClock()
        self.service = tap.makeService(
            self.options(),
            reactor=self.reactor,
            open_files=lambda: 100_000,
        )
        self.service.privilegedStartService()
        self.service.startService()

    def options(self) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--config", str(self.path)])
        return options

    def write(self, **changes: str) -> None:
        values = {
            "name": "a",
            "ports": "20001-20003",
            "user": "alice",
            "path": "release",
            "api": "api",
            "service": "",
            "release": "",
            **changes,
        }
        self.path.write_text(RELOADED.format(**values))

    def reload(self, **changes: str) -> None:
        self.write(**changes)
        self.service.reload()

    def session(self, port: int) -> str:
        return self.service.registry.current(port).id

    def close(self) -> None:
        if self.service.running:
            self.service.stopService()


@pytest.fixture
def reloading(tmp_path: Any, monkeypatch: Any) -> Any:
    made: list[Reloading] = []

    def make(vendor: Vendor, **changes: str) -> Reloading:
        made.append(Reloading(tmp_path, monkeypatch, vendor, **changes))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_a_reload_releases_the_sessions_it_ends(reloading: Any) -> None:
    """
    A reload that removes a port closes its session, and one that changes
    a port's credentials renews it: both ends are released at the vendor,
    though the reload replaces the release settings in the same stroke.
    """
    vendor = Vendor()
    setup = reloading(vendor)
    ended = [setup.session(port) for port in (20001, 20002, 20003)]
    with capturedLogs() as events:
        setup.reload(ports="20002-20003", user="bob", path="v2/release", api="api2")
    assert "2 sessions renewed" in " ".join(formatEvent(e) for e in events)
    setup.reactor.advance(1)
    # Queued before the settings changed, so sent as they were.
    assert vendor.calls == [("/release", "api", ended)]


def test_a_reload_lets_a_release_under_way_finish(reloading: Any) -> None:
    """
    A call retrying after an error when a reload comes goes on retrying,
    under the settings it started with (never the new API credentials to
    the old URL), and the mapping keeps its caller and its counts.
    """
    vendor = Vendor(statuses=(500,))
    setup = reloading(vendor)
    caller = setup.service.releases[0]
    released = setup.session(20001)
    setup.service.registry.close(released, EndReason.RELEASED)
    setup.reactor.advance(0.2)  # sent, answered 500: retried in 1 s
    setup.reload(path="v2/release", api="api2")
    setup.reactor.advance(2)
    assert vendor.calls == [
        ("/release", "api", [released]),
        ("/release", "api", [released]),
    ]
    assert setup.service.releases == [caller]
    assert (caller.succeeded, caller.retried) == (1, 1)
    later = setup.session(20002)
    setup.service.registry.close(later, EndReason.RELEASED)
    setup.reactor.advance(0.2)
    assert vendor.calls[-1] == ("/v2/release", "api2", [later])


def test_a_renamed_mapping_keeps_its_sessions_and_releases_them(reloading: Any) -> None:
    """
    Renaming a mapping changes no credentials, so its sessions stay; they
    are the renamed mapping's from then on, in the API and at release.
    """
    vendor = Vendor()
    setup = reloading(vendor)
    session = setup.session(20001)
    setup.reload(name="renamed")
    live = setup.service.registry.peek(20001)
    assert live is not None and (live.id, live.mapping) == (session, "renamed")
    assert [caller.mapping for caller in setup.service.releases] == ["renamed"]
    setup.service.registry.close(session, EndReason.RELEASED)
    setup.reactor.advance(0.2)
    assert vendor.calls == [("/release", "api", [session])]


def test_the_caller_of_a_mapping_gone_calls_on_until_shutdown(reloading: Any) -> None:
    """
    A mapping renamed (or removed) takes its caller's calls under way
    with it only when they end: retried as before, and waited for by the
    stop if still retrying then.
    """
    vendor = Vendor(statuses=(500, 500))
    setup = reloading(vendor)
    old = setup.service.releases[0]
    released = setup.session(20001)
    setup.service.registry.close(released, EndReason.RELEASED)
    setup.reactor.advance(0.2)
    setup.reload(name="renamed")
    assert setup.service.releases != [old]
    setup.reactor.advance(1)  # the retry, answered 500 again
    assert vendor.calls == [("/release", "api", [released])] * 2
    assert old.pending
    setup.close()
    assert old.pending and setup.service.registry.running  # waiting for it
    setup.reactor.advance(2)  # the last retry, answered 200
    assert vendor.calls == [("/release", "api", [released])] * 3
    assert not old.pending and old.succeeded == 1
    assert not setup.service.registry.running  # the stop went on
    assert setup.reactor.getDelayedCalls() == []


def test_a_stop_releases_the_sessions_nothing_keeps(reloading: Any) -> None:
    """
    With no state file, a stop ends every live session (``stopped``): the
    next process starts afresh, so the vendor may free them.  They go in
    one call with an end still waiting in the batch window, and the stop
    waits for the answer.
    """
    vendor = Vendor()
    setup = reloading(vendor)
    reset, *live = [setup.session(port) for port in (20001, 20002, 20003)]
    setup.service.registry.close(reset, EndReason.RESET)  # queued for 200 ms
    with capturedLogs() as events:
        stopped = setup.service.stopService()
    assert vendor.calls == [("/release", "api", [reset, *live])]
    assert stopped.called and not setup.service.registry.running
    said = [formatEvent(e) for e in events]
    assert f"session {live[0]} of port 20002 ended: stopped" in said
    assert "ended 2 sessions: no state_file keeps them across a restart" in said
    assert f"released sessions {[reset, *live]} of a at the vendor" in said
    assert setup.reactor.getDelayedCalls() == []


def test_a_stop_keeps_the_sessions_a_state_file_saves(reloading: Any, tmp_path: Any) -> None:
    """
    With a state file the sessions are saved for the next process, not
    ended; an end queued before the stop still reaches the vendor.
    """
    state = tmp_path / "sessions.json"
    vendor = Vendor()
    setup = reloading(vendor, service=f'[service]\nstate_file = "{state}"')
    reset, *live = [setup.session(port) for port in (20001, 20002, 20003)]
    setup.service.registry.close(reset, EndReason.RESET)
    stopped = setup.service.stopService()
    assert stopped.called
    assert vendor.calls == [("/release", "api", [reset])]
    saved = json.loads(state.read_text())["sessions"]
    assert [entry["id"] for entry in saved] == live


def test_a_stop_releases_only_the_ends_asked_for(reloading: Any) -> None:
    """
    ``on`` without ``stopped``: the sessions still end, unreleased.
    """
    vendor = Vendor()
    setup = reloading(vendor, release='on = ["reset"]')
    setup.session(20001)
    with capturedLogs() as events:
        setup.service.stopService()
    assert vendor.calls == []
    assert "ended 1 session: no state_file keeps them across a restart" in [
        formatEvent(e) for e in events
    ]


def test_a_stop_waits_for_the_vendor_no_longer_than_the_grace(reloading: Any) -> None:
    """
    A vendor that does not answer holds the stop for ``grace`` seconds;
    then the calls are cancelled, and one warning names the sessions whose
    release was abandoned.
    """
    vendor = Vendor(statuses=(None, None))
    setup = reloading(vendor, service='[service]\ngrace = "3s"')
    reset, stopping = setup.session(20001), setup.session(20002)
    setup.service.registry.close(reset, EndReason.RESET)
    setup.reactor.advance(0.2)  # its call goes, and hangs
    with capturedLogs() as events:
        stopped = setup.service.stopService()
        assert len(vendor.calls) == 2
        setup.reactor.advance(2.9)
        assert not stopped.called and setup.service.registry.running
        setup.reactor.advance(0.1)
    assert stopped.called and not setup.service.registry.running
    said = [formatEvent(e) for e in events]
    assert "waiting up to 3s for 2 vendor release calls" in said
    abandoned = [line for line in said if "abandoned" in line]
    assert abandoned == [
        f"vendor release of sessions {[reset, stopping]} of a abandoned at the stop"
    ]
    assert not any(e.get("log_failure") for e in events), said
    assert setup.reactor.getDelayedCalls() == []
