"""
The reactor proxymap runs on: Twisted's epoll reactor with a leaner event
dispatch.

Twisted's epoll reactor hands every ready descriptor to
``twisted.python.log.callWithLogger``, which asks the descriptor for its log
prefix, copies the legacy logging context dictionary, pushes it, calls
``_doReadOrWrite`` and pops it again.  Under load that wrapper was about a
tenth of proxymap's CPU time (py-spy, CONNECT setups), paid on every read,
write, accept and close.  The context only labels legacy
``twisted.python.log`` messages with a ``system`` prefix; proxymap logs
through ``twisted.logger``, which never reads it.

:class:`LeanEPollReactor` calls ``_doReadOrWrite`` directly and keeps the
wrapper's one other duty: an exception escaping the dispatch (a
``connectionLost`` that raises, say) is logged and the loop goes on with the
next event.  Everything else is the stock reactor.

``twist proxymap`` and ``twistd proxymap`` install it unless a reactor was
already chosen (``--reactor=epoll`` before the subcommand picks the stock one);
see :func:`install_unless_chosen`.
"""

from __future__ import annotations

import errno
import sys

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

log = Logger()


class LeanEPollReactor(EPollReactor):
    """
    An epoll reactor that dispatches events without the legacy log context.
    """

    def doPoll(self, timeout: float | None) -> None:
        """
        Poll for ready descriptors and dispatch each event (see the module).
        """
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        dispatch = self._doReadOrWrite
        selectable_of = self._selectables.get
        for fd, event in events:
            selectable = selectable_of(fd)
            if selectable is None:
                continue  # removed by an earlier event of this batch
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.failure(
                    "Unhandled error dispatching an event to {selectable!r}", selectable=selectable
                )

    doIteration = doPoll


def install() -> None:
    """
    Install :class:`LeanEPollReactor` as the global reactor.
    """
    from twisted.internet.main import installReactor

    installReactor(LeanEPollReactor())


def install_unless_chosen() -> bool:
    """
    Install :class:`LeanEPollReactor` unless a reactor is already installed
    (chosen with ``--reactor``, or imported by whoever runs us).  Returns
    whether it did.

    Called while ``twist``/``twistd`` parse proxymap's options: both install
    a reactor chosen with ``--reactor`` while parsing, before proxymap's
    options, and the default one only after, so a choice is always respected.
    """
    if "twisted.internet.reactor" in sys.modules:
        return False
    install()
    return True
