"""
The open-file limit, raised as far as the system allows and fitted to the
ports and connections the configuration asks for.

Every mapped port holds a listening socket; every client connection takes a
descriptor, and its upstream connection another.  A shell's soft limit is
usually 1024, and so is systemd's for a unit without ``LimitNOFILE``: 1000
ports would then leave room for a dozen connections, and the rest would fail
at ``accept`` or ``connect`` with ``EMFILE`` (a 502, or a connection dropped
unanswered) with nothing in the log but Twisted's recovery notices.

So, at start (:func:`raise_limit`), the soft limit goes up to the hard one,
which is what systemd advises programs that do not use ``select()`` to do
(under Twisted's select reactor, ``--reactor=select``, the limit is left
alone and nothing is fitted: see ``tap.makeService``).  Then :func:`fit` checks that the
limit holds the ports and ``max_connections``: when it holds the ports but
fewer connections, ``max_connections`` is lowered to what it holds, so that
the clients beyond get the 503 (or SOCKS refusal) the limit is for, and one
warning says so; when it cannot hold the ports, start-up (or a reload) fails
with one line saying so.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from proxymap.config import Config, Limits

#: Descriptors kept aside from ports and connections: the epoll set, the
#: admin API and its clients (at most ``admin.site.MAX_CLIENTS``, 32), log
#: and state files, name lookups, standard streams, and Twisted's reserve
#: for ``EMFILE`` recovery.
RESERVE = 64

#: Each client connection and its upstream connection.
PER_CONNECTION = 2

#: In ``--demo`` the sandbox vendor runs in the same process: each
#: connection also takes the sandbox's end of the upstream connection and
#: the sandbox's own connection to the target.
PER_CONNECTION_DEMO = 4


class TooFewOpenFiles(Exception):
    """
    The open-file limit cannot hold the ports themselves.
    """


def raise_limit(
    getrlimit: Callable[[int], tuple[int, int]] | None = None,
    setrlimit: Callable[[int, tuple[int, int]], None] | None = None,
) -> int:
    """
    Raise the soft limit on open files to the hard limit, as far as the
    system lets a process; return the soft limit in force after.
    """
    import resource

    getrlimit = getrlimit or resource.getrlimit
    setrlimit = setrlimit or resource.setrlimit
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or (hard != resource.RLIM_INFINITY and soft >= hard):
        return soft
    # An infinite hard limit cannot be the soft one (Linux caps both at
    # fs.nr_open; macOS at OPEN_MAX): try it, then settle for a round figure.
    for target in (hard, 1 << 20, 1 << 16):
        if target != resource.RLIM_INFINITY and target <= soft:
            continue
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        return target
    return soft


def connection_room(open_files: int, ports: int, per_connection: int = PER_CONNECTION) -> int:
    """
    How many client connections ``open_files`` descriptors hold beside
    ``ports`` listening ports and the reserve.
    """
    return (open_files - ports - RESERVE) // per_connection


def fit(
    limits: Limits,
    ports: int,
    open_files: int,
    per_connection: int = PER_CONNECTION,
) -> tuple[Limits, str | None]:
    """
    ``limits`` with ``max_connections`` lowered to what ``open_files``
    holds beside ``ports``, and a warning saying so (or ``None`` when the
    limit holds them all).

    :raises TooFewOpenFiles: when the limit cannot hold the ports and a
        connection.
    """
    room = connection_room(open_files, ports, per_connection)
    if room < 1:
        raise TooFewOpenFiles(
            f"the open-file limit ({open_files}) cannot hold {ports} ports "
            f"(each takes one, and {RESERVE} are kept aside): raise it "
            "(ulimit -n, or LimitNOFILE= in the systemd unit) or map fewer ports"
        )
    if room >= limits.max_connections:
        return limits, None
    warning = (
        f"the open-file limit ({open_files}) holds {ports} ports and {room} connections, "
        f"not max_connections = {limits.max_connections} (each takes up to {per_connection}): "
        f"clients beyond {room} are refused (503); raise the limit (ulimit -n, or "
        "LimitNOFILE= in the systemd unit) or lower [limits] max_connections"
    )
    return attrs.evolve(limits, max_connections=room), warning


def fitted(config: Config, open_files: int, per_connection: int) -> tuple[Config, str | None]:
    """
    ``config`` with its limits fitted to ``open_files`` beside all its
    mappings' ports, and the warning :func:`fit` gives.

    :raises TooFewOpenFiles: when the limit cannot hold the ports.
    """
    ports = sum(len(m.ports) for m in config.mappings)
    limits, warning = fit(config.limits, ports, open_files, per_connection)
    return attrs.evolve(config, limits=limits), warning
