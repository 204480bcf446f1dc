"""
A real third-party upstream: Debian's squid with Basic auth, whose helper
accepts any ``alice-session-<id>`` username with the right password.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.task import deferLater

from proxymap.config import parse_config
from proxymap.tap import build_service

from .conftest import Origin, curl, free_ports, stop_process

pytestmark = pytest.mark.integration

SQUID = shutil.which("squid") or "/usr/sbin/squid"

AUTH_HELPER = """\
import re, sys, urllib.parse
for line in sys.stdin:
    user, _, password = line.strip().partition(" ")
    user, password = urllib.parse.unquote(user), urllib.parse.unquote(password)
    ok = re.fullmatch(r"alice-session-[A-Za-z0-9]+", user) and password == "s3cret"
    sys.stdout.write("OK\\n" if ok else "ERR\\n")
    sys.stdout.flush()
"""

CONFIG = """\
http_port 127.0.0.1:{port}
auth_param basic program {python} {dir}/auth.py
auth_param basic children 2
auth_param basic realm proxymap-test
auth_param basic casesensitive on
acl authed proxy_auth REQUIRED
http_access allow authed
http_access deny all
cache deny all
access_log stdio:{dir}/access.log squid
cache_log {dir}/cache.log
pid_filename {dir}/squid.pid
coredump_dir {dir}
shutdown_lifetime 0 seconds
pinger_enable off
hosts_file {dir}/hosts
"""

# squid keeps one address per name from a hosts file, the last line's: with
# Debian's stock /etc/hosts ("::1 localhost ..." after "127.0.0.1
# localhost") it would send the tunnel's CONNECT localhost to [::1] alone,
# where the origin does not listen, and answer 503.  Its own file makes the
# test the same on every machine.
HOSTS = "127.0.0.1 localhost\n"


@pytest.fixture
def squid() -> Iterator[tuple[int, Path]]:
    if not os.path.exists(SQUID):
        pytest.fail("squid is not installed (.ci/run installs it)")
    # squid drops root for the 'proxy' user: its directory must be reachable
    # by that user, which pytest's private tmp_path is not.
    directory = Path(tempfile.mkdtemp(prefix="proxymap-squid-", dir="/tmp"))
    directory.chmod(0o777)
    (directory / "auth.py").write_text(AUTH_HELPER)
    (directory / "hosts").write_text(HOSTS)
    (port,) = free_ports(1)
    conf = directory / "squid.conf"
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    conf.write_text(CONFIG.format(port=port, dir=directory, python=python))
    for f in directory.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IROTH)
    proc = subprocess.Popen(
        [SQUID, "-N", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield port, directory
    finally:
        stop_process(proc)
        shutil.rmtree(directory, ignore_errors=True)


async def _wait_listening(port: int) -> None:
    for _ in range(300):  # at most ~15 s: squid starts its helpers first
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        await deferLater(reactor, 0.05)
    pytest.fail(f"squid did not listen on {port}")


@pytest_twisted.ensureDeferred
async def test_squid_sees_each_ports_session(squid: tuple[int, Path], origin: Origin) -> None:
    squid_port, directory = squid
    ports = free_ports(2)
    config = parse_config(
        {
            "mapping": [
                {
                    "name": "squid",
                    "ports": ports,
                    "upstream": f"http://127.0.0.1:{squid_port}",
                    "user": "alice",
                    "pass": "s3cret",
                }
            ]
        },
        env={},
    )
    service = build_service(config, reactor, clock=task.Clock())
    service.privilegedStartService()
    service.startService()
    try:
        await _wait_listening(squid_port)
        for port in ports + ports:
            code, out, err = await curl(
                "-x", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{origin.port}/via-squid"
            )
            assert code == 0, err
            assert b'"path": "/via-squid"' in out
        code, out, err = await curl(
            "-x",
            f"http://127.0.0.1:{ports[0]}",
            "--cacert",
            str(origin.cafile),
            f"https://localhost:{origin.tls_port}/tunnel-via-squid",
        )
        assert code == 0, err
        sessions = [service.registry.peek(port) for port in ports]
    finally:
        await service.stopService()

    lines: list[str] = []
    for _ in range(200):  # squid logs a transaction when it ends (a tunnel: when it closes)
        path = directory / "access.log"
        text = path.read_text() if path.exists() else ""
        # Skip the readiness probe's connection, which carried no request.
        lines = [line for line in text.splitlines() if "HIER_DIRECT" in line]
        if len(lines) >= 5:
            break
        await deferLater(reactor, 0.05)
    users = [line.split()[7] for line in lines]
    a, b = (f"alice-session-{s.id}" for s in sessions)
    assert users == [a, b, a, b, a]
    assert "CONNECT localhost:" in lines[-1]
