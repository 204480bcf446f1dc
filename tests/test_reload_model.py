"""
Reloads of random configurations, against a model: a service on a memory
reactor whose ports hold their address until they close (test_tap's
``HeldAddresses``), its release calls going to a recording vendor
(StubTreq), is taken through random reloads, session starts and ends and
time, and must always match what the configurations say: which ports
listen where, under which mapping, which release callers there are; and,
at the end, every session ended for a reason its mapping's release takes
must have been released, at the release URL its mapping had when it ended.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from treq.testing import StubTreq
from twisted.web.resource import Resource

from proxymap import tap
from proxymap.config import Config, parse_config
from proxymap.ops.state import fingerprint
from proxymap.sessions import EndReason

from .helpers import FUZZ_EXAMPLES
from .test_tap import HeldAddresses

PORTS = range(20001, 20009)
NAMES = ("a", "b", "c")


class Vendor(Resource):
    """
    A release API recording each released id with the path it came to.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.released: list[tuple[str, str]] = []

    def render(self, request: Any) -> bytes:
        for entry in json.loads(request.content.read())["data"]:
            self.released.append((request.path.decode(), entry["sessionId"]))
        return b"{}"


@st.composite
def configs(draw: Any) -> Config:
    """
    One to three mappings over some of :data:`PORTS`, each with a name,
    an address, a user, a lifetime and perhaps a release API at one of
    two paths, taking the default ends or expiry too.
    """
    count = draw(st.integers(1, len(NAMES)))
    names = draw(st.permutations(NAMES))[:count]
    owners = draw(
        st.lists(st.sampled_from([None, *names]), min_size=len(PORTS), max_size=len(PORTS))
    )
    mappings = []
    for name in names:
        ports = [port for port, owner in zip(PORTS, owners) if owner == name]
        if not ports:
            continue
        raw: dict[str, Any] = {
            "name": name,
            "ports": ports,
            "bind": draw(st.sampled_from(["127.0.0.1", "127.0.0.2", "0.0.0.0"])),
            "open_proxy": True,  # for 0.0.0.0
            "upstream": "http://127.0.0.1:9",
            "user": draw(st.sampled_from(["alice", "bob"])),
            "pass": "pw",
            "lifetime": draw(st.sampled_from(["1s", "10m"])),
        }
        path = draw(st.sampled_from([None, "r1", "r2"]))
        if path is not None:
            raw["release"] = {
                "url": f"http://vendor.example/{path}",
                "user": "api",
                "pass": "k",
                "body": '{"data": {entries}}',
                "entry": '{"sessionId": {session}}',
            }
            if draw(st.booleans()):
                raw["release"]["on"] = ["expired", "released"]
        mappings.append(raw)
    if not mappings:
        mappings.append({"name": "a", "ports": [PORTS[0]], "upstream": "http://127.0.0.1:9"})
    return parse_config({"mapping": mappings, "admin": {"listen": ""}}, env={})


def release_path(mapping: Any, reason: EndReason) -> str | None:
    """
    Where the end of a session of ``mapping`` for ``reason`` is released.
    """
    release = mapping.release
    if release is None or reason not in release.on:
        return None
    return "/" + release.url.rsplit("/", 1)[1]


class Reloads(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.vendor = Vendor()
        self.patch = pytest.MonkeyPatch()
        self.patch.setattr(tap, "release_client", lambda reactor: StubTreq(self.vendor))
        self.reactor = HeldAddresses()
        self.service: tap.ProxymapService | None = None
        self.config: Config | None = None
        #: (path, id) of every end the model says is released.
        self.expected: list[tuple[str, str]] = []

    def mapping_of(self, port: int) -> Any:
        assert self.config is not None
        return next(m for m in self.config.mappings if port in m.ports)

    def ended(self, mapping: Any, session_id: str, reason: EndReason) -> None:
        path = release_path(mapping, reason)
        if path is not None:
            self.expected.append((path, session_id))

    @precondition(lambda self: self.service is None)
    @rule(config=configs())
    def start(self, config: Config) -> None:
        self.service = tap.build_service(config, self.reactor)
        self.service.privilegedStartService()
        self.service.startService()
        self.config = config

    @precondition(lambda self: self.service is not None)
    @rule(config=configs())
    def reload(self, config: Config) -> None:
        assert self.service is not None and self.config is not None
        registry = self.service.registry
        for session in registry.list():
            old = self.mapping_of(session.port)
            new = next((m for m in config.mappings if session.port in m.ports), None)
            if new is None:
                self.ended(old, session.id, EndReason.CLOSED)
            elif fingerprint(new) != fingerprint(old):
                self.ended(old, session.id, EndReason.RENEWED)
        self.service.apply(config)
        self.reactor.advance(0)  # ports moved to another address listen there now
        self.config = config

    @precondition(lambda self: self.service is not None)
    @rule(port=st.sampled_from(PORTS))
    def use(self, port: int) -> None:
        assert self.service is not None
        if port in self.service.factories:
            self.service.registry.current(port)

    @precondition(lambda self: self.service is not None)
    @rule(
        port=st.sampled_from(PORTS), reason=st.sampled_from([EndReason.RELEASED, EndReason.RESET])
    )
    def end(self, port: int, reason: EndReason) -> None:
        assert self.service is not None
        session = self.service.registry.peek(port) if port in self.service.factories else None
        if session is not None:
            self.ended(self.mapping_of(port), session.id, reason)
            self.service.registry.close(session.id, reason)

    @precondition(lambda self: self.service is not None)
    @rule(seconds=st.sampled_from([0.1, 0.3, 2.0]))
    def wait(self, seconds: float) -> None:
        assert self.service is not None
        now = self.reactor.seconds()
        for session in self.service.registry.list():
            if session.expires <= now + seconds:
                self.ended(self.mapping_of(session.port), session.id, EndReason.EXPIRED)
        self.reactor.advance(seconds)

    @invariant()
    def as_configured(self) -> None:
        if self.service is None or self.config is None:
            return
        service = self.service
        ports = {port: m for m in self.config.mappings for port in m.ports}
        assert set(service.factories) == set(ports) == set(service.registry.ports())
        for port, mapping in ports.items():
            factory = service.factories[port]
            assert (factory.mapping.name, factory.bind) == (mapping.name, mapping.bind)
            assert self.reactor.held.get((mapping.bind, port)) is factory
        assert {port for _, port in self.reactor.held} == set(ports)
        for session in service.registry.list():
            assert session.mapping == ports[session.port].name
        releasing = [m for m in self.config.mappings if m.release is not None]
        assert [(r.mapping, r.config) for r in service.releases] == [
            (m.name, m.release) for m in releasing
        ]

    def teardown(self) -> None:
        try:
            if self.service is not None:
                self.wait(1)  # the last one-second sessions expire
                self.reactor.advance(1)  # and the last batches go out
                assert sorted(self.vendor.released) == sorted(self.expected)
                self.service.stopService()
        finally:
            self.patch.undo()


Reloads.TestCase.settings = settings(
    max_examples=max(20, FUZZ_EXAMPLES // 3), stateful_step_count=12, deadline=None
)
test_reloads = Reloads.TestCase
