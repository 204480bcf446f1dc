"""
proxymap: every local port an ordinary forward proxy, each with its own
sticky session at a residential proxy vendor.
"""

from __future__ import annotations

__version__ = "0.1.0"


def build_info() -> dict[str, str]:
    """
    Which proxymap this is, and the Python and Twisted it runs on
    (``--version``, and ``proxymap_build_info`` in the metrics).
    """
    import platform

    from twisted.copyright import version as twisted_version

    return {
        "version": __version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "twisted": twisted_version,
    }
