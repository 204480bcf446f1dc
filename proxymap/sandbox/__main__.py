"""
Run the sandbox vendor alone: ``python -m proxymap.sandbox --port 10200``.

Useful to try a real configuration file against it, and for benchmarks that
must keep the vendor off proxymap's core.
"""

from __future__ import annotations

import argparse
from typing import Any

from twisted.logger import globalLogBeginner, textFileLogObserver

from proxymap.sandbox.vendor import SandboxVendor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m proxymap.sandbox", description=__doc__)
    parser.add_argument("--port", type=int, default=10200)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--user", default="demo")
    parser.add_argument("--password", default="demo-secret")
    parser.add_argument("--quiet", action="store_true", help="log nothing")
    args = parser.parse_args(argv)

    from twisted.internet import reactor  # the entry point owns the reactor

    if not args.quiet:
        import sys

        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    from proxymap.tap import LISTEN_BACKLOG

    vendor = SandboxVendor(user=args.user, password=args.password)
    factory: Any = vendor.factory(reactor)  # a ServerFactory; the stubs want it generic
    reactor.listenTCP(args.port, factory, backlog=LISTEN_BACKLOG, interface=args.interface)
    reactor.run()


if __name__ == "__main__":
    main()
