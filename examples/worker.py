"""
A worker tied to one proxymap port: it sees its exit, asks the port's
Session API for a new session, and sees the exit change.  Standard library
only, so any Python 3.9+ runs it::

    python examples/worker.py                       # the demo's port 10201
    python examples/worker.py --proxy http://127.0.0.1:10202 --rounds 3
    python examples/worker.py --url https://ip.sandbox/json --insecure

``--url`` is what the worker fetches to learn its exit: the demo's sandbox
answers ``ip.sandbox`` itself; against a real vendor use an IP echo service
(``--url https://api.ipify.org?format=json``).  ``--insecure`` skips TLS
verification, which the sandbox's self-signed ``ip.sandbox`` needs.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.request
from typing import Any


def fetch(opener: urllib.request.OpenerDirector, url: str) -> Any:
    """
    GET ``url`` through the proxy; its body, as JSON when it is JSON.
    """
    with opener.open(url, timeout=30) as response:
        body = response.read().decode()
    try:
        return json.loads(body)
    except ValueError:
        return body.strip()


def exit_of(answer: Any) -> str:
    """
    The exit an IP echo answer names: the sandbox's ``ip`` and ``session``,
    or an echo service's ``ip``, or the whole answer.
    """
    if isinstance(answer, dict) and "ip" in answer:
        session = answer.get("session")
        return f"{answer['ip']} (session {session})" if session else str(answer["ip"])
    return str(answer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", default="http://127.0.0.1:10201", help="the worker's port")
    parser.add_argument("--url", default="http://ip.sandbox/json", help="where to see the exit")
    parser.add_argument("--api", default="portmapper", help="the Session API's domain")
    parser.add_argument("--rounds", type=int, default=2, help="how many new sessions to ask for")
    parser.add_argument("--insecure", action="store_true", help="skip TLS verification")
    args = parser.parse_args(argv)

    context = ssl.create_default_context()
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": args.proxy, "https": args.proxy}),
        urllib.request.HTTPSHandler(context=context),
    )
    try:
        return work(opener, args.url, f"http://{args.api}/session", args.rounds)
    except urllib.error.URLError as e:
        print(f"worker: {e.reason}", file=sys.stderr)
        return 2


def work(opener: urllib.request.OpenerDirector, url: str, api: str, rounds: int) -> int:
    """
    Show the session and its exit, then ask for ``rounds`` new sessions;
    0 when each changed the exit.
    """
    session = fetch(opener, api + "/")
    print(f"session {session['session_id']}, expires {session['expires_at']}")
    print(f"exit {exit_of(fetch(opener, url))}")
    print(f"exit {exit_of(fetch(opener, url))}  (the same: the session is sticky)")
    changed = True
    for _ in range(max(rounds, 0)):  # bounded by --rounds
        before = exit_of(fetch(opener, url))
        session = fetch(opener, api + "/new")
        after = exit_of(fetch(opener, url))
        print(f"new session {session['session_id']}: exit {after}")
        changed = changed and after != before
    if not changed:
        print("the exit did not change with the session", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
