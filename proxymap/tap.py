"""
``twistd proxymap`` / ``twist proxymap``: command-line options and service assembly.

:func:`makeService` returns a :class:`ProxymapService` holding the session
registry and one listening service per mapped port (plus, with ``--demo``,
the sandbox vendor).  The reactor is a parameter so tests can assemble the
whole service on a ``MemoryReactorClock``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.server import Site

from proxymap import build_info
from proxymap.config import (
    Config,
    ConfigError,
    MappingConfig,
    bracketed,
    load_config,
    parse_config,
)
from proxymap.dataplane.pool import UpstreamPool
from proxymap.dataplane.port import PortFactory
from proxymap.dataplane.server import ProxyFactory, Tally
from proxymap.ops.metrics import Metrics
from proxymap.ops.notify import Notifier
from proxymap.ops.openfiles import (
    PER_CONNECTION,
    PER_CONNECTION_DEMO,
    TooFewOpenFiles,
    fitted,
    raise_limit,
)
from proxymap.ops.state import StateFile, fingerprint
from proxymap.sandbox.release_api import ReleaseAPI
from proxymap.sandbox.vendor import SANDBOX_HOST, SandboxVendor
from proxymap.sessionapi import SessionAPI
from proxymap.sessions import EndReason, PortPolicy, SessionRegistry
from proxymap.vendors.release import VendorRelease, release_client

if TYPE_CHECKING:
    # Imported where the admin listener is built: Klein imports Twisted's
    # global reactor, which would install the stock one before proxymap's
    # options could choose (see _install_reactor).
    from proxymap.admin.api import AdminAPI

log = Logger()

#: A deep accept queue for every TCP listener: scrapers start many workers at
#: once, and a burst beyond Twisted's default of 50 would see SYNs dropped and
#: retried seconds later.
LISTEN_BACKLOG = 1024
DEMO_USER = "demo"
DEMO_PASSWORD = "demo-secret"  # noqa: S105 - the sandbox's public demo password
DEMO_API_USER = "api"
DEMO_API_PASSWORD = "api-secret"  # noqa: S105 - the sandbox release API's demo password
#: Where the demo's admin API listens (the admin API's usual port).
DEMO_ADMIN_PORT = 8700

#: What start-up logs for each mapping once its ports listen (and what
#: ``--check`` prints): one line a mapping, where the stock ports logged one
#: each.
MAPPING_LINE = (
    "mapping {name}: {count} {ports} on {bind}:{spans}, upstream {upstream}, "
    "sessions last {lifetime:g}s"
)
#: The warning an admin API without users gets (at start-up and ``--check``).
OPEN_ADMIN_WARNING = (
    "the admin API on {listen} has no users: anyone on this host can use it "
    "(add [admin.users] to require credentials)"
)


def mapping_fields(mapping: MappingConfig) -> dict[str, Any]:
    """
    The fields of :data:`MAPPING_LINE` for ``mapping``.
    """
    count = len(mapping.ports)
    return {
        "name": mapping.name,
        "count": count,
        "ports": "port" if count == 1 else "ports",
        "bind": bracketed(mapping.bind),
        "spans": port_spans(mapping.ports),
        "upstream": f"{mapping.upstream.scheme}://{mapping.upstream.address}",
        "lifetime": mapping.lifetime,
    }


def demo_config(
    ports: str, sandbox_port: int, release_port: int, admin_port: int = DEMO_ADMIN_PORT
) -> Config:
    """
    The configuration ``--demo`` runs: one mapping onto the sandbox vendor,
    releasing ended sessions through the sandbox's release API, and the
    admin API on ``admin_port`` of 127.0.0.1.
    """
    return parse_config(
        {
            "mapping": [
                {
                    "name": "sandbox",
                    "ports": ports,
                    "upstream": f"http://127.0.0.1:{sandbox_port}",
                    "user": DEMO_USER,
                    "pass": DEMO_PASSWORD,
                    "lifetime": "60s",
                    "params": {"service_type": "RESIDENTIAL-PREMIUM"},
                    "release": {
                        "url": f"http://127.0.0.1:{release_port}/sessions/release/{{service_type}}",
                        "user": DEMO_API_USER,
                        "pass": DEMO_API_PASSWORD,
                        "body": '{"data": {entries}}',
                        "entry": '{"port": {upstream_port}, "sessionId": {session}}',
                    },
                }
            ],
            "session_api": {"enabled": True, "domain": "portmapper"},
            "admin": {"listen": f"tcp:{admin_port}:interface=127.0.0.1"},
        },
        env={},
    )


class Options(usage.Options):
    """
    proxymap's command line.
    """

    synopsis = "[--config FILE | --demo] [--check]"
    longdesc = (
        "Serve every port of the configured ranges as a forward proxy with its own "
        "sticky session at the upstream vendor. With --demo, run against the built-in "
        "sandbox vendor (no account, no internet needed)."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file."],
        ["demo-ports", None, "10201-10210", "Ports of the demo mapping."],
        ["demo-sandbox-port", None, 10200, "Port of the demo's sandbox vendor.", int],
        ["demo-release-port", None, 10199, "Port of the sandbox's release API.", int],
        ["demo-admin-port", None, DEMO_ADMIN_PORT, "Port of the demo's admin API.", int],
    ]
    optFlags = [
        ["demo", None, "Run the demo on the built-in sandbox vendor."],
        [
            "check",
            None,
            "Check the configuration as start-up would, print what it would serve, and "
            "exit: 0 if it is good, otherwise 1 with one line saying what is wrong.",
        ],
    ]

    def opt_version(self) -> NoReturn:
        """
        Display proxymap's version, and the Python and Twisted it runs on, and exit.
        """
        build = build_info()
        print(
            f"proxymap {build['version']} (Twisted {build['twisted']}, "
            f"{build['implementation']} {build['python']})"
        )
        raise SystemExit(0)

    def postOptions(self) -> None:
        _install_reactor()
        if self["demo"] and self["config"]:
            raise usage.UsageError("give either --config or --demo, not both")
        if not self["demo"] and not self["config"]:
            raise usage.UsageError("give --config FILE (or --demo to try proxymap out)")
        try:
            if self["demo"]:
                self.config = demo_config(
                    self["demo-ports"],
                    self["demo-sandbox-port"],
                    self["demo-release-port"],
                    self["demo-admin-port"],
                )
            else:
                self.config = load_config(self["config"])
        except ConfigError as e:
            # One line naming the key and the problem; no usage text, no traceback.
            where = self["config"] or "--demo"
            raise SystemExit(f"proxymap: {where}: {e}") from None
        if self["check"]:
            self._check()

    def _check(self) -> NoReturn:
        """
        ``--check``: say what the configuration would serve, and exit.  Done
        here, while the options are parsed: before twistd starts logging
        (which would take stdout) and before anything listens.
        """
        from twisted.internet import reactor

        where = self["config"] or "--demo"
        open_files = None if _selects(reactor) else _open_files(raise_limit(), self["demo"])
        try:
            lines = check_report(self.config, open_files, demo=self["demo"])
        except TooFewOpenFiles as e:
            raise SystemExit(f"proxymap: {where}: {e}") from None
        for line in lines:
            print(line)
        print(f"proxymap: {where}: configuration OK")
        raise SystemExit(0)


def check_report(
    config: Config, open_files: tuple[int, int] | None, demo: bool = False
) -> list[str]:
    """
    What ``--check`` says of ``config``, which loaded: the warnings start-up
    would log, then the line it logs for each mapping and where the admin
    API would listen.

    ``open_files`` is the open-file limit and the descriptors a connection
    takes, as :func:`makeService` fits the limits to them (``None`` under
    the select reactor, which keeps its limit).  A limit that cannot hold
    the ports raises :class:`TooFewOpenFiles`, as it ends start-up.
    Nothing is bound: a running proxymap holds the ports (``--check`` runs
    before a reload), and a free port now may be taken at start.
    """
    warnings = []
    if open_files is not None:
        config, warning = _fitted(config, open_files, demo)
        if warning is not None:
            warnings.append(warning)
    if config.admin.listen and not config.admin.users:
        warnings.append(OPEN_ADMIN_WARNING.format(listen=config.admin.listen))
    lines = [f"warning: {w}" for w in warnings]
    lines += [MAPPING_LINE.format(**mapping_fields(m)) for m in config.mappings]
    lines.append(f"admin API on {config.admin.listen}" if config.admin.listen else "admin API off")
    return lines


def _install_reactor() -> None:
    """
    Run on proxymap's own reactor (:mod:`proxymap.dataplane.reactor`) unless
    one was chosen with ``--reactor`` or is already running (tests).  Where
    there is no epoll (not Linux), Twisted's default stays.
    """
    try:
        from proxymap.dataplane.reactor import install_unless_chosen
    except ImportError:
        return
    install_unless_chosen()


class CannotStart(Exception):
    """
    Start-up cannot go on; the message says why, in one line.
    """


class _Listener(StreamServerEndpointService):
    """
    A listening port that fails start-up synchronously when it cannot bind,
    and logs where it listens as ``what``.
    """

    def __init__(
        self, endpoint: Any, factory: IProtocolFactory, what: str, description: str, key: str
    ) -> None:
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self.what = what
        #: The endpoint as written, and the configuration key it was written
        #: under, for the one line start-up fails with.
        self.description = description
        self.key = key
        #: The listening port once bound (None before, and after stopping).
        self.listening: Any = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:  # an endpoint raises what its listen raised
            error = e.socketError if isinstance(e, CannotListenError) else e
            why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise CannotStart(
                f"cannot listen on {self.description} ({self.key}): {why or type(error).__name__}"
            ) from None
        if self._waitingForPort is not None:
            self._waitingForPort.addCallback(self._bound)

    def _bound(self, port: Any) -> Any:
        self.listening = port
        host = port.getHost()
        if hasattr(host, "port"):
            where = f"{bracketed(host.host)}:{host.port}"
        else:  # a UNIX socket, its path in bytes
            where = os.fsdecode(host.name)
        log.info("{what} listening on {where}", what=self.what, where=where)
        return port

    def stopService(self) -> Any:
        self.listening = None
        return super().stopService()


class _TCPListener(Service):
    """
    A fixed TCP port on one interface: every mapped port, and the sandbox's.

    Lighter than an endpoint service, because there may be thousands: no
    endpoint object, no description string to parse, no Deferred kept per
    port.  Binding fails start-up synchronously, like ``_Listener`` (which
    serves the admin API's user-given endpoint description).
    """

    def __init__(self, reactor: Any, port: int, bind: str, factory: IProtocolFactory) -> None:
        self.reactor = reactor
        self.port = port
        self.bind = bind
        self.factory = factory
        #: The listening port once bound (None before, and after stopping).
        self.listening: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.listening = self.reactor.listenTCP(
            self.port, self.factory, backlog=LISTEN_BACKLOG, interface=self.bind
        )

    def startService(self) -> None:
        if self.listening is None:  # started without privilegedStartService
            self.privilegedStartService()
        super().startService()

    def move(self, bind: str) -> Deferred[None]:
        """
        Listen on ``bind`` instead, keeping the factory (so the port's
        session and open connections stay).  The old socket must be closed
        before the new one binds, as the two addresses may overlap
        (127.0.0.1 and 0.0.0.0), and Twisted closes it a reactor turn after
        ``stopListening``.  When ``bind`` cannot be bound, the port listens
        where it did again (if it still can), and the result fails with the
        :class:`CannotListenError`.
        """
        old, self.bind = self.bind, bind
        port, self.listening = self.listening, None
        if port is None:  # not listening (not started): the next start binds there
            return succeed(None)

        def listen(_: object) -> None:
            if not self.running:  # stopped while the old socket closed
                return
            try:
                # self.bind, not bind: a second move while this one waited wins.
                self.listening = self.reactor.listenTCP(
                    self.port, self.factory, backlog=LISTEN_BACKLOG, interface=self.bind
                )
            except CannotListenError:
                self.bind = old
                try:
                    self.listening = self.reactor.listenTCP(
                        self.port, self.factory, backlog=LISTEN_BACKLOG, interface=old
                    )
                except CannotListenError:
                    pass  # taken meanwhile: ``listening`` stays None, as health shows
                raise

        return maybeDeferred(port.stopListening).addCallback(listen)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.listening = self.listening, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)


class ProxymapService(MultiService):
    """
    The whole proxymap: the registry and every listener.
    """

    def __init__(
        self,
        registry: SessionRegistry,
        reactor: Any = None,
        grace: float = 10.0,
        notifier: Notifier | None = None,
    ) -> None:
        super().__init__()
        self.registry = registry
        self.reactor = reactor
        self.grace = grace
        self.notifier = notifier or Notifier()
        #: Saves and restores sessions, when [service] state_file is set.
        self.state: StateFile | None = None
        #: Under twistd/twist: take SIGTERM for a graceful stop.
        self.handle_sigterm = False
        self._stopping = False
        #: What the ports share, and the ports themselves (reload changes them).
        self.config: Config | None = None
        self.config_path: str | None = None
        self.session_api = SessionAPI(registry)
        self.tally = Tally()
        self.factories: dict[int, PortFactory] = {}
        self._port_listeners: dict[int, _TCPListener] = {}
        self._release_subscriptions: list[Any] = []
        #: Release callers of mappings a reload removed, still calling.
        self._retired_releases: list[VendorRelease] = []
        #: The sandbox vendor served beside the ports (``--demo``), if any.
        self.sandbox: SandboxVendor | None = None
        #: Its listeners (the vendor's, and its release API's).
        self.sandbox_listeners: list[_TCPListener] = []
        #: The admin API, unless ``[admin] listen`` is empty.
        self.admin: AdminAPI | None = None
        #: Vendor release callers, one per mapping that configures one.
        self.releases: list[VendorRelease] = []
        #: Lines logged once everything listens (the demo's what-to-try).
        self.banner: list[str] = []
        #: The open-file limit and the descriptors a connection takes, when
        #: the limits are fitted to them (see proxymap.ops.openfiles).
        self.open_files: tuple[int, int] | None = None
        registry.setServiceParent(self)

    def privilegedStartService(self) -> None:
        self._loudly(super().privilegedStartService)

    def stopService(self) -> Deferred[None]:
        """
        Stop: the ports and the admin API stop listening and their
        connections close (after :meth:`graceful_stop`, none are left); the
        sessions are saved, or, with no state file to keep them, end
        (``stopped``); the vendor releases due go out, waited for up to
        ``grace`` seconds; then the rest stops, the sandbox last, since
        the releases and the grace may still be calling it.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)  # not running from now on, as MultiService says
        if not self._stopping:
            self._stopping = True
            self.notifier.notify("STOPPING=1")
        factories = self.proxy_factories()
        for factory in factories:
            factory.draining = True
        await gatherResults([listener.stopService() for listener in self.serving_listeners()])
        # Left only when stopped without graceful_stop (SIGINT, a test):
        # the reactor would close them at once anyway, and none may start a
        # session once the sessions have ended.
        for factory in factories:
            for conn in list(factory.connections.values()):
                conn.abort()
        if self.state is not None:
            self.state.save_now()
        else:
            self._end_sessions()
        if self.admin is not None:
            self.admin.cancel_pending()
        if self.tally.pool is not None:
            self.tally.pool.close_all()
        await self._finish_releases()
        count = len(self.factories)
        await maybeDeferred(super().stopService)
        log.info("closed {count} mapped ports", count=count)

    def _end_sessions(self) -> None:
        """
        End every live session (``stopped``): with no state file, the next
        process starts afresh, and the vendor may free what this one held.
        """
        sessions = self.registry.list()
        for session in sessions:
            self.registry.end(session.id, EndReason.STOPPED)
        if sessions:
            log.info(
                "ended {count} {sessions}: no state_file keeps them across a restart",
                count=len(sessions),
                sessions="session" if len(sessions) == 1 else "sessions",
            )

    async def _finish_releases(self) -> None:
        """
        Send every vendor release queued, and wait for the calls under way
        (retries included) up to ``grace`` seconds; cancel what is left.
        """
        callers = [*self.releases, *self._retired_releases]
        for caller in callers:
            caller.flush()
        pending = [d for caller in callers for d in caller.pending]
        if pending:
            log.info(
                "waiting up to {grace:g}s for {count} vendor release {calls}",
                grace=self.grace,
                count=len(pending),
                calls="call" if len(pending) == 1 else "calls",
            )

            def give_up() -> None:
                for caller in callers:
                    caller.stop()

            timer = self.reactor.callLater(self.grace, give_up)
            await DeferredList(pending, consumeErrors=True)
            if timer.active():
                timer.cancel()
        for caller in callers:
            caller.stop()

    def startService(self) -> None:
        self._loudly(super().startService)
        # Every port and the admin API listen by now (binding is synchronous).
        for mapping in self.config.mappings if self.config is not None else ():
            log.info(MAPPING_LINE, **mapping_fields(mapping))
        for line in self.banner:
            log.info("{line}", line=line)
        self.notifier.notify("READY=1")
        if self.handle_sigterm:
            self.reactor.callWhenRunning(self._take_sigterm)

    def _take_sigterm(self) -> None:
        import signal

        def on_sigterm(signum: int, frame: object) -> None:
            self.reactor.callFromThread(self.terminate)

        def on_sighup(signum: int, frame: object) -> None:
            self.reactor.callFromThread(self.reload)

        signal.signal(signal.SIGTERM, on_sigterm)
        signal.signal(signal.SIGHUP, on_sighup)

    # ------------------------------------------------------------ ports

    def add_port(self, port: int, mapping: MappingConfig) -> None:
        """
        Map ``port`` and listen on it (at once, if the service runs).
        """
        assert self.config is not None
        self.registry.add_port(port, PortPolicy(mapping))
        factory = PortFactory(
            self.reactor,
            self.registry,
            port,
            mapping,
            self.session_api,
            self.config.limits,
            self.tally,
        )
        listener = _TCPListener(self.reactor, port, mapping.bind, factory)
        self.factories[port] = factory
        self._port_listeners[port] = listener
        try:
            listener.setServiceParent(self)
        except CannotListenError:
            del self.factories[port], self._port_listeners[port]
            self.registry.remove_port(port)
            self.removeService(listener)
            raise

    def remove_port(self, port: int) -> None:
        """
        Stop listening on ``port``, end its session (closed) and close its connections.
        """
        listener = self._port_listeners.pop(port)
        factory = self.factories.pop(port)
        listener.disownServiceParent()
        session = self.registry.peek(port)
        if session is not None:
            self.registry.close(session.id, EndReason.CLOSED)
        for conn in list(factory.connections.values()):
            conn.abort()
        self.registry.remove_port(port)

    def set_releases(self, config: Config) -> None:
        """
        Make the vendor release callers those of ``config``'s mappings.

        At a reload, the sessions the reload ended (renewed, or closed
        with their ports) are queued at the callers already, and a call
        may be under way for an earlier end: none of it is dropped.  A
        mapping keeping its name keeps its caller (and its counts), given
        the new settings if they changed (:meth:`VendorRelease.configure`).
        The caller of a mapping gone, or renamed, or without a release
        now, takes no further ends, sends what it has queued at once and
        finishes its calls under way; it is stopped only at shutdown if
        still calling then.
        """
        by_name = {
            release.mapping: (release, unsubscribe)
            for release, unsubscribe in self._release_subscriptions
        }
        kept = []
        for mapping in config.mappings:
            if mapping.release is None:
                continue
            upstream = (mapping.upstream.host, mapping.upstream.port)
            params = dict(mapping.params)
            if mapping.name in by_name:
                release, unsubscribe = by_name.pop(mapping.name)
                if (release.config, release.upstream, release.params) != (
                    mapping.release,
                    upstream,
                    params,
                ):
                    release.configure(mapping.release, upstream, params)
                kept.append((release, unsubscribe))
                continue
            release = VendorRelease(
                clock=self.reactor,
                client=release_client(self.reactor),
                mapping=mapping.name,
                config=mapping.release,
                upstream=upstream,
                params=params,
            )
            kept.append((release, self.registry.subscribe(release)))
        for release, unsubscribe in by_name.values():
            unsubscribe()
            release.flush()
            self._retired_releases.append(release)
        self._retired_releases = [r for r in self._retired_releases if r.pending]
        self._release_subscriptions = kept
        self.releases[:] = [release for release, _ in kept]  # in place: metrics holds it

    # ------------------------------------------------------------ reload

    def reload(self) -> None:
        """
        SIGHUP: re-read the configuration file and apply it.
        """
        if self.config_path is None:
            log.info("SIGHUP: nothing to reload (no --config)")
            return
        if self._stopping:  # a reload would listen again on ports just closed
            log.info("SIGHUP: not reloading, proxymap is stopping")
            return
        self.notifier.notify("RELOADING=1")
        warning = None
        try:
            new = load_config(self.config_path)
            if self.open_files is not None:
                new, warning = fitted(new, *self.open_files)
        except (ConfigError, TooFewOpenFiles) as e:
            log.error(
                "reload rejected, the running configuration stays: {path}: {problem}",
                path=self.config_path,
                problem=str(e),
            )
        else:
            if warning is not None:
                log.warn("{warning}", warning=warning)
            # READY once ports moved to another address listen there.
            d = self.apply(new)
            d.addErrback(lambda f: log.failure("reload failed", f))
            d.addCallback(lambda _: self.notifier.notify("READY=1"))
            return
        self.notifier.notify("READY=1")

    def apply(self, new: Config) -> Deferred[None]:
        """
        Move from the running configuration to ``new``: removed ports stop,
        added ports listen, kept ports whose sessions' credentials would
        change get new sessions, kept ports whose mapping's ``bind``
        changed listen there instead; everything else (live sessions, open
        connections) is untouched.  Fires once the moved ports listen
        (a reactor turn later: see :meth:`_TCPListener.move`).
        """
        assert self.config is not None
        old = self.config
        old_ports = {port: m for m in old.mappings for port in m.ports}
        new_ports = {port: m for m in new.mappings for port in m.ports}
        if new.admin != old.admin or new.service != old.service:
            log.warn("[admin] and [service] changes take effect at the next restart")
        self.config = attrs.evolve(new, admin=old.admin, service=old.service)
        if self.tally.pool is not None:
            self.tally.pool.configure(new.limits)
        for port in sorted(set(old_ports) - set(new_ports)):
            self.remove_port(port)
        renewed = 0
        moved = []
        for port in sorted(set(old_ports) & set(new_ports)):
            mapping = new_ports[port]
            factory = self.factories[port]
            if mapping.bind != old_ports[port].bind:
                moved.append(port)
            factory.mapping = mapping
            factory.protocols = mapping.protocols
            factory.connect_timeout = mapping.connect_timeout
            if factory.limits != new.limits:
                factory.limits = new.limits
                for conn in list(factory.connections.values()):
                    conn.limits_changed()
            factory.forget_target()
            self.registry.add_port(port, PortPolicy(mapping))
            session = self.registry.peek(port)
            if session is not None and fingerprint(old_ports[port]) != fingerprint(mapping):
                self.registry.end(session.id, EndReason.RENEWED)
                renewed += 1
            elif session is not None:
                # Kept under a mapping that may have been renamed: its end
                # is the new mapping's (its release, its name in the API).
                session.mapping = mapping.name
        added = []
        for port in sorted(set(new_ports) - set(old_ports)):
            try:
                self.add_port(port, new_ports[port])
                added.append(port)
            except CannotListenError as e:
                log.error(
                    "reload: cannot listen on port {port}: {error}",
                    port=port,
                    error=str(e.socketError),
                )
        moves = [self._move(port, new_ports[port].bind) for port in moved]
        self.set_releases(new)
        removed = set(old_ports) - set(new_ports)
        # Which ports, since they log no line of their own.
        log.info(
            "reloaded: {added} ports added{added_spans}, {removed} removed{removed_spans}, "
            "{renewed} sessions renewed{moved}",
            added=len(added),
            added_spans=f" ({port_spans(added)})" if added else "",
            removed=len(removed),
            removed_spans=f" ({port_spans(removed)})" if removed else "",
            renewed=renewed,
            moved=f", {len(moved)} moved to another address ({port_spans(moved)})" if moved else "",
        )
        return gatherResults(moves).addCallback(lambda _: None)

    def _move(self, port: int, bind: str) -> Deferred[None]:
        """
        Listen for ``port`` on ``bind`` (its mapping's new address); its
        session and open connections stay.  When ``bind`` cannot be bound,
        the port stays where it was, and an error says so.
        """
        factory = self.factories[port]
        old = factory.bind
        factory.bind = bind
        listener = self._port_listeners[port]

        def failed(reason: Failure) -> None:
            reason.trap(CannotListenError)
            assert isinstance(reason.value, CannotListenError)
            factory.bind = old
            log.error(
                "reload: cannot listen on {bind}:{port}: {error}; {where}",
                bind=bracketed(bind),
                port=port,
                error=str(reason.value.socketError),
                where=f"it stays on {bracketed(old)}"
                if listener.listening is not None
                else f"and {bracketed(old)}:{port} is taken now too: the port listens nowhere",
            )

        return listener.move(bind).addErrback(failed)

    def terminate(self) -> None:
        """
        SIGTERM: stop gracefully, then stop the reactor (the process exits 0).
        """
        if self._stopping:
            return
        d = Deferred.fromCoroutine(self.graceful_stop())
        d.addErrback(lambda f: log.failure("graceful stop failed", f))
        d.addBoth(lambda _: self.reactor.stop())

    async def graceful_stop(self) -> None:
        """
        Stop accepting; close idle keep-alive connections; let tunnels and
        requests in flight finish for ``grace`` seconds; close the rest.
        :meth:`stopService`, which :meth:`terminate` comes to next, saves
        or ends the sessions.
        """
        self._stopping = True
        self.notifier.notify("STOPPING=1")
        log.info("stopping: {grace}s for open tunnels and requests", grace=self.grace)
        factories = self.proxy_factories()
        for factory in factories:
            factory.draining = True
        await gatherResults([listener.stopService() for listener in self.serving_listeners()])
        if self.tally.pool is not None:
            self.tally.pool.close_all()
        for factory in factories:
            for conn in list(factory.connections.values()):
                if conn.state == "idle":
                    conn.transport.loseConnection()  # type: ignore[union-attr]
        for _ in range(int(self.grace / 0.1) + 1):  # bounded: at most the grace
            if not any(f.connections for f in factories):
                break
            await deferLater(self.reactor, 0.1)
        left = [c for f in factories for c in f.connections.values()]
        if left:
            log.info("closing {count} connections still open after the grace", count=len(left))
        for conn in left:
            conn.abort()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """
        Up when every port and the admin API listen and no stop is under way.
        """
        listeners = self.listeners()
        up = sum(1 for listener in listeners if listener.listening is not None)
        details = {
            "listening": up,
            "listeners": len(listeners),
            "sessions": len(self.registry.list()),
        }
        return up == len(listeners) and not self._stopping, details

    def proxy_factories(self) -> list[ProxyFactory]:
        return [
            listener.factory
            for listener in self.listeners()
            if isinstance(listener.factory, ProxyFactory)
        ]

    @staticmethod
    def _loudly(start: Any) -> None:
        try:
            start()
        except CannotListenError as e:
            address = f"{e.interface or '0.0.0.0'}:{e.port}"  # noqa: S104 - a message, not a bind
            raise SystemExit(f"proxymap: cannot listen on {address}: {e.socketError}") from None
        except CannotStart as e:
            raise SystemExit(f"proxymap: {e}") from None

    def listeners(self) -> list[_Listener | _TCPListener]:
        return [s for s in self if isinstance(s, (_Listener, _TCPListener))]

    def serving_listeners(self) -> list[_Listener | _TCPListener]:
        """
        The mapped ports and the admin API: what a stop stops first.  The
        sandbox's (``--demo``) serve until the end, as its vendor is the
        ports' upstream and its release API theirs.
        """
        return [s for s in self.listeners() if s not in self.sandbox_listeners]


def port_spans(ports: Iterable[int]) -> str:
    """
    Ports as runs: ``10201-10300,10400``.
    """
    runs: list[list[int]] = []
    for port in sorted(ports):
        if runs and port == runs[-1][1] + 1:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def makeService(
    options: Options, reactor: Any = None, open_files: Callable[[], int] = raise_limit
) -> ProxymapService:
    """
    Assemble proxymap from parsed options.

    ``open_files`` raises the process's open-file limit and returns it; the
    limits are fitted to it (:mod:`proxymap.ops.openfiles`).
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    sandbox: tuple[SandboxVendor, int] | None = None
    if options["demo"]:
        vendor = SandboxVendor(
            user=DEMO_USER,
            password=DEMO_PASSWORD,
            api_user=DEMO_API_USER,
            api_password=DEMO_API_PASSWORD,
        )
        sandbox = (vendor, options["demo-sandbox-port"])
    config = options.config
    service_open_files = None
    if not _selects(reactor):
        service_open_files = _open_files(open_files(), options["demo"])
        try:
            config, warning = _fitted(config, service_open_files, options["demo"])
        except TooFewOpenFiles as e:
            raise SystemExit(f"proxymap: {options['config'] or '--demo'}: {e}") from None
        if warning is not None:
            log.warn("{warning}", warning=warning)
    service = build_service(
        config,
        reactor,
        sandbox=sandbox,
        sandbox_release_port=options["demo-release-port"] if options["demo"] else None,
    )
    service.handle_sigterm = True
    service.config_path = options["config"]
    service.open_files = service_open_files
    return service


def _open_files(limit: int, demo: bool) -> tuple[int, int]:
    """
    The open-file limit and the descriptors a connection takes: in the
    demo, the sandbox vendor's ends as well.
    """
    return limit, PER_CONNECTION_DEMO if demo else PER_CONNECTION


def _fitted(config: Config, open_files: tuple[int, int], demo: bool) -> tuple[Config, str | None]:
    """
    ``config`` fitted to ``open_files`` (see :func:`fitted`), and the
    warning to give, if any: none in the demo, whose limits are not the
    user's.
    """
    config, warning = fitted(config, *open_files)
    return config, None if demo else warning


def _selects(reactor: Any) -> bool:
    """
    Whether ``reactor`` waits with ``select()``, which cannot watch a
    descriptor numbered past 1023 (so its limit is best left alone).
    """
    from twisted.internet.selectreactor import SelectReactor

    return isinstance(reactor, SelectReactor)


def build_service(
    config: Config,
    reactor: Any,
    clock: IReactorTime | None = None,
    sandbox: tuple[SandboxVendor, int] | None = None,
    sandbox_release_port: int | None = None,
) -> ProxymapService:
    """
    Assemble proxymap from a validated configuration.

    ``clock`` drives session expiry (the reactor by default); ``sandbox`` is
    a sandbox vendor to serve on a loopback port beside the mapped ports.
    """
    registry = SessionRegistry(clock=clock or reactor)
    root = ProxymapService(registry, reactor, config.service.grace, Notifier.from_environ())

    if sandbox is not None:
        vendor, sandbox_port = sandbox
        root.sandbox = vendor
        root.sandbox_listeners.append(
            _TCPListener(reactor, sandbox_port, "127.0.0.1", vendor.factory(reactor))
        )
        if sandbox_release_port is not None:
            release_site = Site(ReleaseAPI(vendor), reactor=reactor)
            release_site.noisy = False
            root.sandbox_listeners.append(
                _TCPListener(reactor, sandbox_release_port, "127.0.0.1", release_site)
            )
        for listener in root.sandbox_listeners:
            listener.setServiceParent(root)

    root.config = config
    pool = root.tally.pool = UpstreamPool(reactor, config.limits)
    registry.subscribe(pool)
    for mapping in config.mappings:
        for port in mapping.ports:
            root.add_port(port, mapping)
    factories = root.factories

    if config.service.state_file:
        from twisted.internet.threads import deferToThread

        state = StateFile(
            Path(config.service.state_file),
            registry,
            clock or reactor,
            run_write=deferToThread if clock is None else (lambda f: f()),
        )
        state.restore()
        registry.subscribe(state)
        root.state = state

    root.set_releases(config)
    releases = root.releases

    if config.admin.listen:
        from proxymap.admin.api import AdminAPI
        from proxymap.admin.site import AdminSite

        api = AdminAPI(
            registry,
            factories,
            config.admin.users,
            metrics=Metrics(registry, factories, releases, pool),
            health=root.health,
            health_open=config.admin.health_open,
        )
        root.admin = api
        _Listener(
            serverFromString(reactor, config.admin.listen),
            AdminSite(api.app.resource(), reactor),
            "admin API",
            config.admin.listen,
            "admin.listen",
        ).setServiceParent(root)
        if not config.admin.users:
            log.warn(OPEN_ADMIN_WARNING, listen=config.admin.listen)

    if sandbox is not None:
        first = config.mappings[0]
        admin = re.fullmatch(r"tcp:(\d+):interface=127\.0\.0\.1", config.admin.listen)
        p1, p2 = first.ports[0], first.ports[min(1, len(first.ports) - 1)]
        root.banner = [
            # The mapping's own line, just before, gives its ports and lifetime.
            "proxymap demo: the upstream is the built-in sandbox vendor; try:",
            f"  curl -x http://127.0.0.1:{p1} http://{SANDBOX_HOST}/json   "
            "# the same exit every time",
            f"  curl -x http://127.0.0.1:{p2} http://{SANDBOX_HOST}/json   "
            "# another port, another exit",
            f"  curl -k -x http://127.0.0.1:{p1} https://{SANDBOX_HOST}/json   "
            "# HTTPS through a CONNECT tunnel: the same exit",
            f"  curl -x http://127.0.0.1:{p1} http://{first.session_api.domain}/session/new   "
            "# a new session (and exit) for this port, now",
        ] + (
            [f"  curl http://127.0.0.1:{admin.group(1)}/sessions   # every session (admin API)"]
            if admin
            else []
        )
    return root
