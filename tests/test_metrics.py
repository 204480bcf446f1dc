"""
Metrics after known traffic, read back through the exposition format; and
the health endpoint.
"""

from __future__ import annotations

import platform
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.copyright import version as twisted_version
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

import proxymap
from proxymap import tap
from proxymap.admin.api import AdminAPI
from proxymap.config import Config, Secret, parse_config
from proxymap.ops.metrics import Metrics
from proxymap.sandbox.release_api import ReleaseAPI
from proxymap.sandbox.vendor import SandboxVendor
from proxymap.sessions import EndReason
from proxymap.tap import build_service

from .helpers import PORT, Harness

GET = b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(all_samples: dict[Any, float], name: str, **labels: str) -> float:
    return all_samples[(name, tuple(sorted(labels.items())))]


@pytest_twisted.ensureDeferred
async def test_metrics_after_known_traffic() -> None:
    h = Harness()
    metrics = Metrics(h.registry, h.factories)
    api = AdminAPI(h.registry, h.factories, metrics=metrics)
    treq = StubTreq(api.app.resource())

    proto, _ = h.client()
    proto.dataReceived(GET)
    up, first = h.upstream()
    up.dataReceived(OK)
    proto.dataReceived(GET)  # the same upstream connection, reused
    up.dataReceived(OK)
    h.registry.renew(PORT)  # the first session ends: its counters fold into the totals
    proto.dataReceived(b"POST http://example.com/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
    up, second = h.upstream()
    up.dataReceived(OK)
    sent = len(first.value()) + len(second.value())  # heads and the body, as sent
    other, _ = h.client(10202)
    other.dataReceived(GET)
    h.fail_connect(ConnectionRefusedError())

    response = await treq.get("http://admin.test/metrics")
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    got = samples((await response.content()).decode())
    port = {"mapping": "vendor-a", "port": str(PORT)}
    assert value(got, "proxymap_sessions_started_total", **port) == 2
    assert value(got, "proxymap_sessions_ended_total", reason="renewed", **port) == 1
    assert value(got, "proxymap_sessions_active", **port) == 1
    assert value(got, "proxymap_connections_open", **port) == 1
    assert value(got, "proxymap_requests_total", **port) == 3
    assert value(got, "proxymap_bytes_to_upstream_total", **port) == sent
    assert value(got, "proxymap_bytes_from_upstream_total", **port) == 3 * len(OK)
    refused = {"mapping": "vendor-a", "port": "10202"}
    assert value(got, "proxymap_upstream_errors_total", kind="unreachable", **refused) == 1
    assert value(got, "proxymap_sessions_active", mapping="vendor-a", port="10203") == 0
    assert any(name == "process_resident_memory_bytes" for name, _ in got)
    build = {
        "version": proxymap.__version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "twisted": twisted_version,
    }
    assert value(got, "proxymap_build_info", **build) == 1
    assert proxymap.build_info() == build


@pytest_twisted.ensureDeferred
async def test_kept_upstream_connections() -> None:
    h = Harness(pool=True)
    metrics = Metrics(h.registry, h.factories, pool=h.tally.pool)
    treq = StubTreq(AdminAPI(h.registry, h.factories, metrics=metrics).app.resource())
    one_shot = GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    proto, _ = h.client()
    proto.dataReceived(one_shot)
    up, _ = h.upstream()
    up.dataReceived(OK)  # parked
    proto, _ = h.client()
    proto.dataReceived(one_shot)  # reused
    up.connectionLost(Failure(ConnectionDone()))  # ... and retried on a new one
    fresh, _ = h.upstream()
    fresh.dataReceived(OK)  # parked
    got = samples((await (await treq.get("http://admin.test/metrics")).content()).decode())
    assert value(got, "proxymap_upstream_idle_connections") == 1
    assert value(got, "proxymap_upstream_reused_total") == 1
    assert value(got, "proxymap_upstream_retried_total") == 1


@pytest_twisted.ensureDeferred
async def test_health_and_its_auth() -> None:
    config = parse_config(
        {
            "mapping": [{"ports": "20001-20002", "upstream": "http://h:1"}],
            "admin": {"listen": "tcp:28700:interface=127.0.0.1", "users": {"ops": "pw"}},
        },
        env={},
    )
    service = build_service(config, MemoryReactorClock())
    service.privilegedStartService()
    service.startService()
    api = service.admin
    assert api is not None
    treq = StubTreq(api.app.resource())
    assert (await treq.get("http://a/health")).code == 401
    response = await treq.get("http://a/health", auth=("ops", "pw"))
    assert response.code == 200
    assert await response.json() == {"status": "ok", "listening": 3, "listeners": 3, "sessions": 0}
    assert (await treq.get("http://a/metrics")).code == 401

    open_api = AdminAPI(
        api.registry,
        api.factories,
        (("ops", Secret("pw")),),
        health=service.health,
        health_open=True,
    )
    open_treq = StubTreq(open_api.app.resource())
    assert (await open_treq.get("http://a/health")).code == 200
    assert (await open_treq.get("http://a/sessions")).code == 401

    service.listeners()[0].stopService()  # a port stops listening
    response = await treq.get("http://a/health", auth=("ops", "pw"))
    assert response.code == 503 and (await response.json())["status"] == "down"
    service.stopService()


@pytest_twisted.ensureDeferred
async def test_vendor_release_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The release calls of each mapping are counted by result, and still are
    after a reload gives the mapping's caller new settings.
    """
    vendor = SandboxVendor(api_user="api", api_password="api-secret")
    monkeypatch.setattr(tap, "release_client", lambda reactor: StubTreq(ReleaseAPI(vendor)))

    def config(password: str, name: str = "geo") -> Config:
        release = {"url": "http://vendor.test/sessions/release/X", "user": "api", "pass": password}
        raw = {"name": name, "ports": "20001", "upstream": "http://h:1", "preset": "geonode"}
        raw["release"] = release
        return parse_config(
            {"mapping": [raw], "admin": {"listen": "tcp:0:interface=127.0.0.1"}}, env={}
        )

    reactor = MemoryReactorClock()
    service = build_service(config("api-secret"), reactor)
    service.privilegedStartService()
    service.startService()
    assert service.admin is not None
    treq = StubTreq(service.admin.app.resource())

    async def calls() -> dict[tuple[str, str], float]:
        text = (await (await treq.get("http://a/metrics")).content()).decode()
        family = "proxymap_vendor_release_calls_total"
        return {
            (dict(labels)["mapping"], dict(labels)["result"]): count
            for (name, labels), count in samples(text).items()
            if name == family and count
        }

    def release_one() -> None:
        session = service.registry.current(20001)
        service.registry.close(session.id, EndReason.RELEASED)
        reactor.advance(1)
        for caller in service.releases:
            caller.client.flush()  # type: ignore[attr-defined]

    release_one()
    assert await calls() == {("geo", "succeeded"): 1}
    service.apply(config("wrong"))  # the same caller, new settings: the vendor says 401
    release_one()
    assert await calls() == {("geo", "succeeded"): 1, ("geo", "failed"): 1}
    service.apply(config("api-secret", name="geo-2"))  # renamed: a new caller
    release_one()
    assert await calls() == {("geo-2", "succeeded"): 1}
    assert len(vendor.release_calls) == 2  # the sandbox records only calls it let in
    service.stopService()


def test_registering_reads_no_port() -> None:
    """
    Registration checks names from describe(), which names every family
    collect() yields: it does not walk the ports (that cost ~2.7 KB a port of
    start-up memory), and a clash with another collector is still caught.
    """
    h = Harness()

    class Untouchable(dict):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            raise AssertionError("the ports were read at registration")

    metrics = Metrics(h.registry, Untouchable(h.factories))
    described = {family.name for family in metrics.describe()}
    metrics.factories = h.factories
    collected = {family.name for family in metrics.collect()}
    assert described == collected
    assert all(not family.samples for family in metrics.describe())
