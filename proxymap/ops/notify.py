"""
The systemd notification protocol (``sd_notify``): one datagram per state
change to the socket named by ``$NOTIFY_SOCKET``.  Without that variable
(not run by systemd with ``Type=notify``) nothing is sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import attrs
from twisted.logger import Logger

log = Logger()


@attrs.frozen
class Notifier:
    """
    Sends ``READY=1``, ``STOPPING=1`` and friends to systemd.
    """

    path: str = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        environ = os.environ if environ is None else environ
        return cls(environ.get("NOTIFY_SOCKET", ""))

    def notify(self, message: str) -> None:
        """
        Send one notification; a failure is logged, never raised (a daemon
        must not die because its supervisor is not listening).
        """
        if not self.path:
            return
        # "@name" is a socket in the abstract namespace.
        address = "\0" + self.path[1:] if self.path.startswith("@") else self.path
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)  # a datagram to a local socket: never waits
                sock.sendto(message.encode(), address)
        except OSError as e:
            log.warn("cannot notify systemd ({error})", error=e.strerror or str(e))
