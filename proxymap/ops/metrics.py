"""
Prometheus metrics, with the official ``prometheus_client``.

Values are read when Prometheus scrapes, from state proxymap keeps anyway:
the data plane does no metric work per request or per byte.  Session starts
and ends are counted by a registry observer, which also folds an ended
session's request and byte counters into its port's totals, so the totals
are monotonic across rotations.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

import proxymap
from proxymap.dataplane.pool import UpstreamPool
from proxymap.dataplane.port import PortFactory
from proxymap.sessions import EndReason, Session, SessionRegistry

#: What ``proxymap_build_info`` says: which proxymap runs, on what, so that
#: after an upgrade a scrape shows which processes run the new one.
BUILD = proxymap.build_info()
_BUILD_HELP = "The running proxymap's version, and the Python and Twisted it runs on"


class Metrics:
    """
    proxymap's collector and its own registry (never the global one).
    """

    def __init__(
        self,
        registry: SessionRegistry,
        factories: dict[int, PortFactory],
        releases: Sequence[Any] = (),
        pool: UpstreamPool | None = None,
    ) -> None:
        self.sessions = registry
        self.factories = factories
        self.releases = releases
        self.pool = pool
        self.started: Counter[int] = Counter()
        self.ended: Counter[tuple[int, str]] = Counter()
        #: Per port: requests, bytes to and from upstream of sessions that ended.
        self.totals: defaultdict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        registry.subscribe(self)

    # SessionObserver
    def session_started(self, session: Session) -> None:
        self.started[session.port] += 1

    def session_ended(self, session: Session, reason: EndReason) -> None:
        self.ended[(session.port, reason.value)] += 1
        totals = self.totals[session.port]
        totals[0] += session.requests
        totals[1] += session.bytes_up
        totals[2] += session.bytes_down

    @staticmethod
    def _families() -> list[Any]:
        """
        proxymap's metric families, empty.
        """
        labels = ["mapping", "port"]

        def family(kind: type, name: str, text: str, extra: Sequence[str] = ()) -> Any:
            return kind(f"proxymap_{name}", text, labels=[*labels, *extra])

        return [
            family(CounterMetricFamily, "sessions_started", "Sessions started"),
            family(CounterMetricFamily, "sessions_ended", "Sessions ended", ["reason"]),
            family(GaugeMetricFamily, "sessions_active", "Ports with a live session"),
            family(GaugeMetricFamily, "connections_open", "Open client connections"),
            family(CounterMetricFamily, "requests", "Requests and tunnels proxied"),
            family(CounterMetricFamily, "bytes_to_upstream", "Bytes sent upstream"),
            family(CounterMetricFamily, "bytes_from_upstream", "Bytes from upstream"),
            family(CounterMetricFamily, "upstream_errors", "Upstream failures", ["kind"]),
            CounterMetricFamily(
                "proxymap_vendor_release_calls",
                "Vendor release calls",
                labels=["mapping", "result"],
            ),
            GaugeMetricFamily(
                "proxymap_upstream_idle_connections",
                "Idle upstream connections kept for the next client connection of their session",
            ),
            CounterMetricFamily(
                "proxymap_upstream_reused",
                "Requests sent over a kept upstream connection instead of a new one",
            ),
            CounterMetricFamily(
                "proxymap_upstream_retried",
                "Requests sent again because a reused upstream connection had closed",
            ),
        ]

    def describe(self) -> Iterable[Metric]:
        """
        The families without their samples: what the registry checks names
        against when this collector registers.  Without it the registry would
        collect every port's samples once at start-up (about 2.7 KB a port,
        freed, but the process keeps the memory).
        """
        return [*self._families(), InfoMetricFamily("proxymap_build", _BUILD_HELP)]

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        started, ended, active, conns, requests, up, down, errors, release, *pooled = families
        for port in sorted(self.factories):
            factory = self.factories[port]
            value = [factory.mapping.name, str(port)]
            session = self.sessions.peek(port)
            totals = self.totals.get(port, [0, 0, 0])
            live = (
                (session.requests, session.bytes_up, session.bytes_down) if session else (0, 0, 0)
            )
            started.add_metric(value, self.started[port])
            active.add_metric(value, 1 if session else 0)
            conns.add_metric(value, len(factory.connections))
            requests.add_metric(value, totals[0] + live[0])
            up.add_metric(value, totals[1] + live[1])
            down.add_metric(value, totals[2] + live[2])
            for reason in EndReason:
                count = self.ended[(port, reason.value)]
                if count:
                    ended.add_metric([*value, reason.value], count)
            for kind, count in sorted(factory.upstream_errors.items()):
                errors.add_metric([*value, kind], count)
        for caller in self.releases:
            release.add_metric([caller.mapping, "succeeded"], caller.succeeded)
            release.add_metric([caller.mapping, "failed"], caller.failed)
            release.add_metric([caller.mapping, "retried"], caller.retried)
        pool = self.pool
        if pool is not None:
            idle, reused, retried = pooled
            idle.add_metric([], len(pool))
            reused.add_metric([], pool.reused)
            retried.add_metric([], pool.retried)
        return [*families, InfoMetricFamily("proxymap_build", _BUILD_HELP, value=BUILD)]
