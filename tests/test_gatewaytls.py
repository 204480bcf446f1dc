"""
TLS to a vendor's gateway (dataplane/gatewaytls.py): the options shared per
host and trust, and what a failed handshake is reported as.
"""

from __future__ import annotations

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from proxymap.dataplane.gatewaytls import client_options, failure_detail
from proxymap.dataplane.localtls import LocalCertificates


def test_options_are_made_once_per_host_and_trust() -> None:
    pem = LocalCertificates().pem("gw.example.com")
    first = client_options("gw.example.com", (pem,))
    assert client_options("gw.example.com", (pem,)) is first
    assert client_options("other.example.com", (pem,)) is not first
    assert client_options("gw.example.com") is not first


def test_what_a_failed_handshake_says() -> None:
    verify = SSL.Error([("SSL routines", "", "certificate verify failed")])
    assert failure_detail(Failure(verify), "gw") == "certificate verify failed"
    assert failure_detail(Failure(SSL.Error()), "gw") == "the handshake failed"
    misnamed = VerificationError(errors=[])
    assert failure_detail(Failure(misnamed), "gw") == "its certificate does not name gw"
    for plain in (ConnectionDone(), ConnectionLost()):
        assert failure_detail(Failure(plain), "gw") is None
