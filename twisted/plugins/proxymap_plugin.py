"""
Twisted plugin that makes ``twistd proxymap`` and ``twist proxymap`` work.

Only a ServiceMaker lives here: the application is imported lazily by
Twisted, so an import error in proxymap does not make the plugin vanish
silently from ``twistd --help``.
"""

from twisted.application.service import ServiceMaker

proxymap = ServiceMaker(
    "proxymap",
    "proxymap.tap",
    "Map local proxy ports to sticky sessions of residential proxy vendors.",
    "proxymap",
)
