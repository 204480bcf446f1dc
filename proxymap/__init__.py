"""
proxymap: every local port an ordinary forward proxy, each with its own
sticky session at a residential proxy vendor.
"""

__version__ = "0.1.0"
