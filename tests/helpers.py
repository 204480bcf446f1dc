"""
Test helpers: a mapped port on a MemoryReactorClock, driven through StringTransports.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.testing import MemoryReactorClock, StringTransport

from proxymap.config import Limits, MappingConfig, SessionIdSpec, parse_config
from proxymap.credentials import basic_authorization
from proxymap.dataplane.names import HostCache
from proxymap.dataplane.pool import UpstreamPool
from proxymap.dataplane.port import PortFactory
from proxymap.dataplane.server import ProxyServer, Tally
from proxymap.dataplane.upstream import UpstreamProtocol
from proxymap.sessions import PortPolicy, SessionRegistry

#: Examples per fuzz test; raise it for a long run outside CI
#: (PROXYMAP_FUZZ_EXAMPLES=20000, see README).
FUZZ_EXAMPLES = int(os.environ.get("PROXYMAP_FUZZ_EXAMPLES", "300"))

UPSTREAM_HOST = "gw.example.com"
#: Where the harness's resolver says UPSTREAM_HOST is.
UPSTREAM_ADDRESS = "192.0.2.10"
UPSTREAM_PORT = 10000
PORT = 10201


def mapping(**overrides: Any) -> MappingConfig:
    """
    A validated mapping onto ``gw.example.com:10000`` as user alice.
    """
    raw = {
        "name": "vendor-a",
        "ports": "10201-10203",
        "upstream": f"http://{UPSTREAM_HOST}:{UPSTREAM_PORT}",
        "user": "alice",
        "pass": "s3cret",
        "lifetime": "10m",
    }
    raw.update(overrides)
    return parse_config({"mapping": [raw]}, env={}).mappings[0]


def counting_ids() -> Any:
    """
    A deterministic id source: ``sess0001``, ``sess0002``, ...
    """
    counter = itertools.count(1)

    def new_id(spec: SessionIdSpec) -> str:
        return f"sess{next(counter):04d}"

    return new_id


def creds(session_id: str, user: str = "alice", password: str = "s3cret") -> bytes:
    """
    The Proxy-Authorization value proxymap sends for ``session_id``.
    """
    return basic_authorization(f"{user}-session-{session_id}", password)


class Harness:
    """
    A registry and mapped ports on a MemoryReactorClock.
    """

    def __init__(self, limits: Limits | None = None, pool: bool = False, **overrides: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.tally = Tally()
        #: Names the harness's resolver knows, and the names it was asked.
        self.addresses = {UPSTREAM_HOST: UPSTREAM_ADDRESS}
        self.looked_up: list[str] = []
        self.pending: dict[str, Deferred[str]] = {}
        self.tally.names = HostCache(self.reactor, resolve=self.resolve)
        # The gateway's name is known before the first connection, as it
        # is soon after a real start.
        self.tally.names.lookup(UPSTREAM_HOST)
        self.reactor.advance(0)
        self.mapping = mapping(**overrides)
        self.registry = SessionRegistry(clock=self.reactor, new_id=counting_ids())
        if pool:  # as the service has it (tap.build_service)
            self.tally.pool = UpstreamPool(self.reactor, limits)
            self.registry.subscribe(self.tally.pool)
        policy = PortPolicy(self.mapping)
        self.factories = {}
        for port in self.mapping.ports:
            self.registry.add_port(port, policy)
            self.factories[port] = PortFactory(
                self.reactor, self.registry, port, self.mapping, None, limits, self.tally
            )
        self.factory = self.factories[PORT]

    def resolve(self, host: str) -> Deferred[str]:
        """
        The harness's resolver: ``addresses`` at once; a name under
        ``.invalid`` fails at once; any other name waits in ``pending``.
        """
        self.looked_up.append(host)
        if host in self.addresses:
            return succeed(self.addresses[host])
        if host.endswith(".invalid"):
            return fail(DNSLookupError(host))
        self.pending[host] = Deferred()
        return self.pending[host]

    def client(self, port: int = PORT) -> tuple[ProxyServer, StringTransport]:
        """
        A client connection to ``port``.
        """
        proto = self.factories[port].buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        proto.makeConnection(transport)
        return proto, transport

    def upstream(self, index: int = -1) -> tuple[UpstreamProtocol, StringTransport]:
        """
        Complete the ``index``-th outgoing connection the data plane started.
        """
        host, port, connector_factory, _timeout, _bind = self.reactor.tcpClients[index]
        proto = connector_factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        proto.makeConnection(transport)
        return proto, transport

    def fail_connect(self, reason: Exception, index: int = -1) -> None:
        from twisted.python.failure import Failure

        connector_factory = self.reactor.tcpClients[index][2]
        connector_factory.clientConnectionFailed(None, Failure(reason))


def cut(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    """
    ``stream`` cut at the offsets ``cuts`` (in any order, repeated or at
    either end): the reads a peer sending it in pieces would give, none
    empty, as a transport never delivers an empty read.
    """
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def head_of(data: bytes) -> tuple[bytes, list[bytes], bytes]:
    """
    Split a message into its first line, header lines and the rest.
    """
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    return lines[0], lines[1:], rest


def header(lines: list[bytes], name: bytes) -> list[bytes]:
    """
    The values of header ``name`` among ``lines``.
    """
    prefix = name.lower() + b":"
    return [line.split(b":", 1)[1].strip() for line in lines if line.lower().startswith(prefix)]


def delays_acks(skt: socket.socket) -> bool:
    """
    Whether the kernel counts ``skt`` as interactive, so that the ACK of
    what it receives next waits (``TCP_QUICKACK`` reads 0 then; Linux).
    """
    return skt.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 0


def with_open_files(soft: int, hard: int) -> list[str]:
    """
    The command line prefix that runs a command under these open-file limits
    (util-linux's ``prlimit``, as a shell's ``ulimit -n`` would).
    """
    return ["prlimit", f"--nofile={soft}:{hard}", "--"]
