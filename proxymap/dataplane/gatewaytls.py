"""
TLS to a vendor's gateway: ``https://`` upstreams.

Some vendors' gateways take TLS on their proxy port (Oxylabs documents
``curl -x https://pr.oxylabs.io:7777``), so that the session credentials in
``Proxy-Authorization`` do not cross the network in the clear.  A mapping
with an ``https://`` upstream starts TLS on every upstream connection as
soon as TCP connects, then speaks to the gateway exactly as over plain TCP:
requests in absolute form, CONNECT for tunnels (TLS to the target then runs
inside TLS to the gateway).

The gateway's certificate must name the upstream's host (a DNS name or an IP
address, checked by service_identity) and chain to the system's authorities,
or to the mapping's ``upstream_ca`` instead.

The client options hold an OpenSSL context, which loads the trust store
when made: :func:`client_options` makes one per host and trust and shares
it between every port and connection of the process.
"""

from __future__ import annotations

import functools
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.python.failure import Failure


@functools.lru_cache(maxsize=64)
def client_options(host: str, ca: tuple[bytes, ...] = ()) -> Any:
    """
    The TLS client options for the gateway at ``host``: its certificate
    must name ``host`` and chain to ``ca`` (PEM certificates) or, when
    there are none, to the system's authorities.
    """
    if ca:
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem) for pem in ca])
    else:
        trust = ssl.platformTrust()
    return ssl.optionsForClientTLS(host, trustRoot=trust)


def failure_detail(reason: Failure, host: str) -> str | None:
    """
    What a connection's end says about its TLS, for a log line and the
    client's 502: ``None`` when it was not TLS that failed.
    """
    if reason.check(VerificationError):
        return f"its certificate does not name {host}"
    if reason.check(SSL.Error):
        # pyOpenSSL's errors are lists of (library, function, reason).
        args = getattr(reason.value, "args", ())
        entries = args[0] if args and isinstance(args[0], list) else []
        reasons = [str(entry[-1]) for entry in entries if isinstance(entry, tuple) and entry]
        return "; ".join(reasons) or "the handshake failed"
    return None
