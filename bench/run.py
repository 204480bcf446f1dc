#!/usr/bin/env python3
"""
The benchmark harness: proxymap against the bare Twisted reference, its peers
and the parent itself, in one run.

    python bench/run.py                 # everything (about 15 minutes)
    python bench/run.py --quick         # a smoke run: every phase, tiny sizes

It installs what it needs (apt: wrk, tinyproxy, squid, gcc, nodejs, and
pypy3 for the -pypy subjects; pip: pproxy 2.7.9 in its own venv, and this
tree with its dependencies in a PyPy venv; npm: proxy-chain 2.7.1; all under
bench/.cache; loadgen.c built with gcc), starts every server on 127.0.0.1 and
stops every process it started.

proxymap-pypy and reference-pypy are proxymap and the reference on Debian's
pypy3.  A JIT serves from compiled code only after it has seen a path, so
each of their rounds starts with a second of every load, unmeasured (see
warm()); a long-running proxy spends its life past that point.

Method:
- the subject under test runs alone on core 0; the terminal fake parent
  (bench/parent.py) and the load tools (wrk, bench/loadgen.c) share core 1;
  the subject's CPU use is recorded per measurement (it should be ~100%);
- subjects are interleaved A B C A B C over --reps repetitions, each on a
  fresh process, and the median is reported;
- loadgen ramps its connections and spreads client source addresses over
  127.0.0.2-9 (squid gets one source: it slows down with many);
- memory is the slope of RSS between 1,000 and 5,000 idle tunnels on a fresh
  process (on PyPy also of the live heap, which RSS does not follow there:
  bench/collected.py); bytes per listening port is read from 1 to 1001
  ports and as the slope from 1001 to 5001 (see ports()); the probe
  latency (loadgen's c1 probe, see probe_p99()) is measured again with as
  many idle tunnels as the fd limit allows: min(10,000, (limit - ports -
  64) / 2 - 8: room for the probe's connection beside them, since proxymap
  fits max_connections to (limit - ports - 64) / 2), and a twin of the
  subject that holds no tunnel is probed in turn as a control (see
  memory()).

Output: one JSON line per result in bench/results/run-STAMP.jsonl and a
Markdown table of ratios (proxymap, or --ours, against each subject, same
run) in bench/results/run-STAMP.md.  Stickiness is checked against the parent's
per-username counts: each sampled port only ever sent its own session's
username, and traffic over N ports used exactly N session usernames.
The harness never asserts timings: it reports them.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
sys.path.insert(0, str(HERE))

from common import free_ports, free_range, stop_all, wait_listening  # noqa: E402

USER, PASSWORD = "bench", "pw"
SUBJECT_CORE, LOAD_CORE = "0", "1"
PEERS = ("pproxy", "tinyproxy", "squid", "proxy-chain")
SQUID = "/usr/sbin/squid"
TINYPROXY = "/usr/bin/tinyproxy"
PPROXY = CACHE / "pproxy" / "bin" / "pproxy"
PYPY = CACHE / "pypy" / "bin" / "python"
PYPY_SUBJECTS = ("proxymap-pypy", "reference-pypy")
LOADGEN = CACHE / "loadgen"
NODE_MODULES = CACHE / "node" / "node_modules"


# -- installing ----------------------------------------------------------------


def install(subjects: list[str], parent: str = "cpython") -> None:
    """
    Everything the chosen subjects need, installed only when missing.
    """
    need = []
    if shutil.which("wrk") is None:
        need.append("wrk")
    if shutil.which("gcc") is None:
        need.append("gcc")
    if shutil.which("ss") is None:
        need.append("iproute2")
    if "tinyproxy" in subjects and not os.path.exists(TINYPROXY):
        need.append("tinyproxy")
    if "squid" in subjects and not os.path.exists(SQUID):
        need.append("squid")
    if "proxy-chain" in subjects and shutil.which("node") is None:
        need.append("nodejs")
    pypy = parent == "pypy" or any(s in PYPY_SUBJECTS for s in subjects)
    if pypy and shutil.which("pypy3") is None:
        need += ["pypy3", "pypy3-venv"]
    if need:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *need],
            check=True,
            env=env,
        )
    CACHE.mkdir(exist_ok=True)
    if "pproxy" in subjects and not PPROXY.exists():
        venv = CACHE / "pproxy"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # pproxy 2.7.9 crashes with uvloop >= 0.22; the plain install does not
        # pull uvloop in, and the check below keeps it that way.
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", "pproxy==2.7.9"], check=True
        )
    if "pproxy" in subjects:
        probe = subprocess.run(
            [str(CACHE / "pproxy" / "bin" / "python"), "-c", "import uvloop"],
            capture_output=True,
        )
        if probe.returncode == 0:
            raise SystemExit("uvloop is in bench/.cache/pproxy: pproxy 2.7.9 crashes with it")
    if pypy and not PYPY.exists():
        venv = CACHE / "pypy"
        subprocess.run(["pypy3", "-m", "venv", str(venv)], check=True)
        # Editable: the venv measures this tree as it is now.  cryptography
        # >= 44 has no PyPy 3.9 wheel (README, "Running on PyPy").
        pip = [str(PYPY), "-m", "pip", "install", "--quiet", "--only-binary=cryptography"]
        subprocess.run([*pip, "-e", str(HERE.parent)], check=True)
    if "proxy-chain" in subjects and not (NODE_MODULES / "proxy-chain").exists():
        if shutil.which("npm") is None:  # Debian's nodejs comes without it
            sudo = [] if os.geteuid() == 0 else ["sudo"]
            subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "npm"], check=True)
        npm = ["npm", "install", "--silent", "--no-audit", "--no-fund"]
        subprocess.run([*npm, "--prefix", str(CACHE / "node"), "proxy-chain@2.7.1"], check=True)
    source = HERE / "loadgen.c"
    if not LOADGEN.exists() or LOADGEN.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(LOADGEN), str(source)], check=True)


# -- processes -----------------------------------------------------------------


def pinned(core: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", core, *argv]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def settled_rss(running: Running) -> int:
    """
    A subject's RSS half a second after it listens.
    """
    time.sleep(0.5)
    assert running.pid is not None
    return rss_bytes(running.pid)


def live_heap(running: Running, work: Path, timeout: float = 30) -> int:
    """
    What a subject on PyPy keeps: its collector's heap after a full
    collection, asked of bench/collected.py, which runs every one of
    PYPY_SUBJECTS (RSS does not tell it on PyPy; see there).
    """
    assert running.name in PYPY_SUBJECTS and running.pid is not None
    path = work / f"{running.pid}.json"
    path.unlink(missing_ok=True)
    os.kill(running.pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{running.name} did not report its heap in {timeout} s")
        time.sleep(0.05)
    heap: int = json.loads(path.read_text())["heap"]
    return heap


@dataclass
class Running:
    """
    A started subject: where to send load, and what to stop afterwards.
    """

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None
    admin: int | None = None
    auth: str | None = None  # a Basic token the client must send (direct only)
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop_all([self.proc])
        for action in self.cleanup:
            action()


class CpuCap:
    """
    A cgroup (v1's cpu controller) holding each subject to ``share`` of its
    core, in 10 ms periods (``--subject-cpu``).  A spread ratio means
    something only while the subject is the limit; a subject faster than
    the load core can drive (proxymap-pypy on one request per connection)
    is the limit again when capped, and its rate is then its CPU cost per
    request, as an uncapped subject's is.
    """

    ROOT = Path("/sys/fs/cgroup/cpu")

    def __init__(self, share: float) -> None:
        if not (self.ROOT / "cpu.cfs_quota_us").exists():
            raise SystemExit(f"--subject-cpu: no cgroup v1 cpu controller at {self.ROOT}")
        self.path = self.ROOT / f"proxymap-bench-{os.getpid()}"
        self.path.mkdir()
        (self.path / "cpu.cfs_period_us").write_text("10000")
        (self.path / "cpu.cfs_quota_us").write_text(str(round(share * 10000)))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        self.path.rmdir()  # every subject has stopped, so it is empty


def _token(username: str) -> str:
    return base64.b64encode(f"{username}:{PASSWORD}".encode()).decode()


def subject_env() -> dict[str, str]:
    """
    The environment subjects run in: this one, with this tree's bytecode
    written (next to its sources, in ``__pycache__``, as git ignores) and
    compiled before any subject starts.

    An installed proxymap has its bytecode (pip compiles it at install, as
    it did every dependency's); the bench runs this tree, editable.  Where
    the environment says ``PYTHONDONTWRITEBYTECODE`` (as this machine's
    does), every start compiled proxymap's modules from source: on PyPy
    ~0.07-0.1 s of its start-up, a cost no installed proxymap pays and the
    reference (one script over compiled Twisted) never paid.
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    tree = [str(HERE.parent / "proxymap"), str(HERE.parent / "twisted" / "plugins")]
    for python in (sys.executable, str(PYPY)):
        if Path(python).exists():
            subprocess.run([python, "-m", "compileall", "-q", *tree], check=True, env=env)
    return env


class Rig:
    """
    The parent, and how to start each subject on fresh ports.
    """

    def __init__(self, work: Path, python: str = sys.executable, cap: CpuCap | None = None) -> None:
        self.work = work
        self.cap = cap
        # Where subjects run by bench/collected.py report their heap (live_heap).
        os.environ["BENCH_HEAP_DIR"] = str(work)
        self.env = subject_env()
        (self.parent_port,) = free_ports(1)
        self.parent = subprocess.Popen(
            pinned(
                LOAD_CORE,
                [python, str(HERE / "parent.py"), str(self.parent_port), USER, PASSWORD],
            ),
            stdout=subprocess.PIPE,
        )
        wait_listening([self.parent_port])

    def close(self) -> None:
        stop_all([self.parent])
        if self.cap is not None:
            self.cap.close()

    def counts(self) -> dict[str, int]:
        """
        Requests per username at the parent since the last look.
        """
        request = urllib.request.Request(
            "http://parent.counts/",
            headers={"Proxy-Authorization": "Basic " + _token(f"{USER}-session-harness")},
        )
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{self.parent_port}"})
        )
        with opener.open(request, timeout=10) as response:
            counts: dict[str, int] = json.load(response)
        return counts

    def start(self, name: str, nports: int = 1) -> Running:
        if name == "direct":
            return Running(name, self.parent_port, None, auth=_token(f"{USER}-session-direct"))
        first = free_range(nports)[0]
        start = getattr(self, "_start_" + name.replace("-", "_"))
        running: Running = start(first, nports)
        try:
            # Without connecting: bytes per port must not count probe connections.
            admin = [] if running.admin is None else [running.admin]
            wait_listening([*range(first, first + nports), *admin])
        except BaseException:
            running.stop()
            raise
        return running

    def _popen(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            pinned(SUBJECT_CORE, argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.work,
            env=self.env if env is None else env,
        )
        if self.cap is not None:
            self.cap.add(proc.pid)  # taskset execs the subject: the same pid
        return proc

    def _python(self, name: str, python: str) -> list[str]:
        """
        How to start ``python`` for subject ``name``: through
        bench/collected.py on PyPy, so that live_heap() can ask it.
        """
        if name not in PYPY_SUBJECTS:
            return [python]
        return [python, str(HERE / "collected.py")]

    def _start_reference(
        self, first: int, nports: int, name: str = "reference", python: str = sys.executable
    ) -> Running:
        argv = [*self._python(name, python), str(HERE / "reference.py"), str(first), str(nports)]
        argv += [str(self.parent_port), USER, PASSWORD]
        return Running(name, first, self._popen(argv))

    def _start_reference_pypy(self, first: int, nports: int) -> Running:
        return self._start_reference(first, nports, "reference-pypy", str(PYPY))

    def _start_proxymap(
        self,
        first: int,
        nports: int,
        name: str = "proxymap",
        twist: tuple[str, ...] = (),
        limits: str = "",
        python: str = sys.executable,
    ) -> Running:
        (admin,) = free_ports(1)
        config = self.work / f"proxymap-{first}.toml"
        config.write_text(
            # The harness measures capacity, not the default caps (1000 a port,
            # 9000 in all): it holds up to ~10,000 tunnels through one port.
            "[limits]\nmax_connections_per_port = 20000\nmax_connections = 20000\n"
            f"{limits}"
            f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n'
            f'[[mapping]]\nports = "{first}-{first + nports - 1}"\n'
            f'upstream = "http://127.0.0.1:{self.parent_port}"\n'
            f'user = "{USER}"\npass = "{PASSWORD}"\nlifetime = "1h"\n'
        )
        argv = [*self._python(name, python), "-m", "twisted", *twist, "proxymap"]
        argv += ["--config", str(config)]
        return Running(name, first, self._popen(argv), admin=admin)

    def _start_proxymap_stock(self, first: int, nports: int) -> Running:
        # proxymap on Twisted's stock epoll reactor instead of its own: what
        # proxymap/dataplane/reactor.py is worth, measured in the same run.
        return self._start_proxymap(first, nports, "proxymap-stock", ("--reactor=epoll",))

    def _start_proxymap_pypy(self, first: int, nports: int) -> Running:
        return self._start_proxymap(first, nports, "proxymap-pypy", python=str(PYPY))

    def _start_proxymap_unkept(self, first: int, nports: int) -> Running:
        # proxymap keeping no upstream connection across client connections
        # (README: Upstream connections), as the reference and the peers do:
        # what keeping is worth, and our code's cost on the same work.
        limits = "max_idle_upstreams = 0\n"
        return self._start_proxymap(first, nports, "proxymap-unkept", limits=limits)

    def _start_pproxy(self, first: int, nports: int) -> Running:
        assert nports == 1
        argv = [str(PPROXY), "-l", f"http://127.0.0.1:{first}"]
        argv += ["-r", f"http://127.0.0.1:{self.parent_port}#{USER}-session-pproxy:{PASSWORD}"]
        return Running("pproxy", first, self._popen(argv))

    def _start_proxy_chain(self, first: int, nports: int) -> Running:
        assert nports == 1
        upstream = f"http://{USER}-session-proxychain:{PASSWORD}@127.0.0.1:{self.parent_port}"
        argv = ["node", str(HERE / "proxy_chain.js"), str(first), upstream]
        proc = self._popen(argv, env=dict(os.environ, NODE_PATH=str(NODE_MODULES)))
        return Running("proxy-chain", first, proc)

    def _start_tinyproxy(self, first: int, nports: int) -> Running:
        assert nports == 1
        conf = self.work / f"tinyproxy-{first}.conf"
        conf.write_text(
            f"Port {first}\nListen 127.0.0.1\nTimeout 600\nMaxClients 10000\n"
            "Allow 127.0.0.0/8\nDisableViaHeader Yes\nLogLevel Critical\n"
            f"Upstream http {USER}-session-tinyproxy:{PASSWORD}@127.0.0.1:{self.parent_port}\n"
        )
        return Running("tinyproxy", first, self._popen([TINYPROXY, "-d", "-c", str(conf)]))

    def _start_squid(self, first: int, nports: int) -> Running:
        assert nports == 1
        # squid drops root for the 'proxy' user: its files must be reachable.
        directory = Path(tempfile.mkdtemp(prefix="proxymap-bench-squid-", dir="/tmp"))
        directory.chmod(0o777)
        conf = directory / "squid.conf"
        conf.write_text(
            f"http_port 127.0.0.1:{first}\n"
            f"cache_peer 127.0.0.1 parent {self.parent_port} 0 no-query no-digest default "
            f"login={USER}-session-squid:{PASSWORD}\n"
            "never_direct allow all\nhttp_access allow all\ncache deny all\n"
            f"access_log none\ncache_log {directory}/cache.log\n"
            f"pid_filename {directory}/squid.pid\ncoredump_dir {directory}\n"
            "shutdown_lifetime 0 seconds\npinger_enable off\nmax_filedescriptors 20000\n"
            "dns_v4_first on\nforwarded_for delete\nvia off\n"
        )
        conf.chmod(0o644)
        running = Running("squid", first, self._popen([SQUID, "-N", "-f", str(conf)]))
        running.cleanup.append(lambda: shutil.rmtree(directory, ignore_errors=True))
        return running


# -- load ----------------------------------------------------------------------


def _duration(text: str) -> float:
    """
    A wrk duration ("45.00us", "1.20ms", "2.00s") in microseconds.
    """
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(text)
    scale = {"us": 1, "ms": 1e3, "s": 1e6, "m": 60e6}[match.group(2)]
    return float(match.group(1)) * scale


def wrk(
    running: Running, work: Path, seconds: float, connections: int, close: bool
) -> dict[str, float]:
    lua = work / f"wrk-{running.name}.lua"
    lines = ['wrk.method = "GET"', 'wrk.path = "http://bench.parent/"']
    if running.auth:
        lines.append(f'wrk.headers["Proxy-Authorization"] = "Basic {running.auth}"')
    if close:
        lines.append('wrk.headers["Connection"] = "close"')
    lua.write_text("\n".join(lines) + "\n")
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    argv += ["-s", str(lua), f"http://127.0.0.1:{running.port}/"]
    out = subprocess.run(
        pinned(LOAD_CORE, argv),
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if rate is None or p50 is None or p99 is None:
        raise SystemExit(f"wrk said:\n{out}")
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    return {
        "rate": float(rate.group(1)),
        "p50_us": _duration(p50.group(1)),
        "p99_us": _duration(p99.group(1)),
        "errors": 0 if failed is None else 1,
    }


def loadgen(running: Running, mode: str, seconds: float, *options: str) -> dict[str, Any]:
    argv = [str(LOADGEN), mode, str(running.port), "-d", str(seconds), *options]
    if running.auth:
        argv += ["-a", running.auth]
    if running.name == "squid":
        argv += ["-s", "0"]
    out = subprocess.run(
        pinned(LOAD_CORE, argv), capture_output=True, text=True, timeout=seconds + 60, check=True
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


@contextmanager
def held_tunnels(running: Running, count: int, timeout: float) -> Iterator[int]:
    """
    Hold ``count`` idle CONNECT tunnels through ``running`` for the duration
    of the block; yields how many opened.
    """
    argv = [str(LOADGEN), "hold", str(running.port), "-c", str(count), "-d", str(timeout)]
    argv += ["-r", "200"]
    if running.auth:
        argv += ["-a", running.auth]
    if running.name == "squid":
        argv += ["-s", "0"]
    proc = subprocess.Popen(
        pinned(LOAD_CORE, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        yield int(line.split()[1]) if line.startswith("ready ") else 0
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- phases --------------------------------------------------------------------


@dataclass
class Results:
    """
    Every sample, and the JSON lines written as results come in.
    """

    out: Path
    samples: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    cpu: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, subject: str, metric: str, value: float, cpu: float | None = None) -> None:
        self.samples.setdefault((subject, metric), []).append(value)
        line: dict[str, Any] = {"subject": subject, "metric": metric, "value": value}
        if cpu is not None:
            self.cpu.setdefault((subject, metric), []).append(cpu)
            line["subject_cpu"] = round(cpu, 3)
        with self.out.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)

    def median(self, subject: str, metric: str) -> float | None:
        values = self.samples.get((subject, metric))
        return statistics.median(values) if values else None


def warm(running: Running, work: Path, spread: int = 1) -> None:
    """
    For a subject on a JIT (one of PYPY_SUBJECTS): a second of each load,
    unmeasured, so that what is measured runs compiled; then, with
    ``spread``, a second over that many ports.  Nothing for the others.
    """
    if running.name not in PYPY_SUBJECTS:
        return
    wrk(running, work, 1, 32, False)
    wrk(running, work, 1, 32, True)
    loadgen(running, "http", 1, "-c", "32", "-x")
    loadgen(running, "connect", 1, "-c", "32")
    loadgen(running, "bulk", 1, "-c", "4")
    if spread > 1:
        loadgen(running, "http", 1, "-c", "32", "-n", str(spread))


def measured(running: Running, run: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], float]:
    """
    Run one load, and the share of a core the subject used meanwhile.
    """
    pid = running.pid
    before = cpu_seconds(pid) if pid else 0.0
    start = time.monotonic()
    result = run()
    elapsed = time.monotonic() - start
    used = (cpu_seconds(pid) - before) / elapsed if pid else 0.0
    return result, used


def throughput(rig: Rig, results: Results, subjects: list[str], args: argparse.Namespace) -> None:
    """
    The six load figures, subjects interleaved, a fresh process each round.
    """
    seconds = args.seconds
    for _ in range(args.reps):
        for name in subjects:
            running = rig.start(name)
            try:
                warm(running, rig.work)
                loads: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                    ("keep-alive req/s c32", partial(wrk, running, rig.work, seconds, 32, False)),
                    (
                        "one request per connection req/s",
                        partial(wrk, running, rig.work, seconds, 32, True),
                    ),
                    (
                        "one request per connection, client closes req/s",
                        partial(loadgen, running, "http", seconds, "-c", "32", "-x"),
                    ),
                    ("c1 latency", partial(wrk, running, rig.work, seconds, 1, False)),
                    ("CONNECT setups/s", partial(loadgen, running, "connect", seconds, "-c", "32")),
                    ("tunnel bulk bytes/s", partial(loadgen, running, "bulk", seconds, "-c", "4")),
                ]
                for metric, load in loads:
                    result, cpu = measured(running, load)
                    if result.get("errors"):
                        print(f"warning: {name} {metric}: errors: {result}", flush=True)
                    if metric == "c1 latency":
                        results.add(name, "c1 latency p50 us", result["p50_us"], cpu)
                        results.add(name, "c1 latency p99 us", result["p99_us"], cpu)
                    else:
                        results.add(name, metric, result["rate"], cpu)
            finally:
                running.stop()


def probe_rounds(args: argparse.Namespace) -> int:
    """
    Probes per subject and phase in the memory phase.
    """
    return 1 if args.quick else 5


def probe_p99(running: Running, twin: Running, args: argparse.Namespace) -> tuple[float, float]:
    """
    The c1 probe's p99 in microseconds for the subject and its twin, probed
    in turn: the median of probe_rounds() short probes each, because a
    single p99 on this kind of machine moves several-fold between runs on
    its own.

    The probe is loadgen's (one keep-alive connection, every response's
    latency recorded), not wrk's.  With ~40k loopback sockets open, wrk's
    own c1 p99 reads 2-5x its idle value whichever subject it measures,
    while two other clients, probing the same process in turn, read
    0.95-1.1x (bench/RESULTS.rst, run W): that part is wrk's, not the
    subject's.
    """
    seconds = min(3.0, args.seconds)
    rounds = probe_rounds(args)
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(rounds):
        for subject, into in ((running, ours), (twin, theirs)):
            result = loadgen(subject, "http", seconds, "-c", "1", "-k", "-l", "-w", "0.5")
            if result.get("errors") or "p99_us" not in result:
                print(f"warning: {subject.name}: probe errors: {result}", flush=True)
            into.append(result.get("p99_us", 0.0))
    return statistics.median(ours), statistics.median(theirs)


def memory(rig: Rig, results: Results, subjects: list[str], args: argparse.Namespace) -> None:
    """
    Bytes per idle tunnel (slope from low to high) and the probe's p99 with
    as many idle tunnels as the fd limit allows, on a fresh process.

    The probe is also sent, in turn, to a twin: a second fresh process of
    the same subject on the same core that holds no tunnel.  The twin is the
    control: its ratio shows how far the machine itself moved between the
    two probes.  It was once the correction too, when the probe was wrk's,
    whose p99 rose ~3x for the twin as for the subject once ~40k loopback
    sockets were open (see probe_p99); with loadgen's probe the twin moves
    0.81-1.10x, and dividing by it only adds the noise of two more p99s.  So
    the target is on the subject's own ratio; the ratio over the twin's is
    still reported.

    On PyPy the RSS slope follows the collector, not the tunnels (see
    bench/collected.py), so PyPy subjects also report the slope of their
    live heap, each end read after a full collection, which also sets where
    the collector's next full collection falls; RSS is read first.
    """
    low, high = args.tunnels
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    # proxymap holds max_connections to (limit - ports - 64) // 2
    # (proxymap/ops/openfiles.py): keep room for the probe's connection.
    most = min(10_000, (limit - 1 - 64) // 2 - 8) if not args.quick else high + 50
    for name in subjects:
        if name == "direct":
            continue
        running = rig.start(name)
        twin: Running | None = None
        try:
            twin = rig.start(name)
            warm(running, rig.work)
            warm(twin, rig.work)
            before, twin_before = probe_p99(running, twin, args)
            assert running.pid is not None
            base = rss_bytes(running.pid)
            pypy = name in PYPY_SUBJECTS
            with held_tunnels(running, low, 120) as got_low:
                time.sleep(1)
                rss_low = rss_bytes(running.pid)
                heap_low = live_heap(running, rig.work) if pypy else 0
                with held_tunnels(running, high - low, 120) as got_high:
                    time.sleep(1)
                    rss_high = rss_bytes(running.pid)
                    heap_high = live_heap(running, rig.work) if pypy else 0
                    with held_tunnels(running, most - high, 120) as got_most:
                        held = got_low + got_high + got_most
                        time.sleep(1)
                        after, twin_after = probe_p99(running, twin, args)
            if got_low == low and got_high == high - low:
                slope = (rss_high - rss_low) / (high - low)
                results.add(name, "bytes per idle tunnel", slope)
                if pypy:
                    heap_slope = (heap_high - heap_low) / (high - low)
                    results.add(name, "bytes per idle tunnel, live heap", heap_slope)
            else:
                print(f"warning: {name} held only {got_low + got_high} of {high}", flush=True)
            results.add(name, "idle RSS bytes", base)
            results.add(name, "idle tunnels held", held)
            results.add(name, "probe p99 us, idle", before)
            if not (before and twin_before and after and twin_after):
                print(f"warning: {name}: a probe failed", flush=True)
            else:
                results.add(name, "probe p99 us, tunnels held", after)
                results.add(name, "probe p99 with tunnels / without", after / before)
                results.add(
                    name, "twin: probe p99 with tunnels / without", twin_after / twin_before
                )
                results.add(
                    name,
                    "probe p99 with tunnels / without, over the twin's",
                    (after / before) / (twin_after / twin_before),
                )
        finally:
            running.stop()
            if twin is not None:
                twin.stop()


def ports(rig: Rig, results: Results, subjects: list[str], args: argparse.Namespace) -> None:
    """
    Bytes per listening port, start-up time of many ports, traffic spread
    over many ports against one port, and the stickiness check.

    Bytes per listening port is read two ways, each RSS the median of
    three fresh processes (one in --quick) read 0.5 s after they listen.
    From 1 port to many + 1, as it always was, it counts what a process
    spends once to start many ports as well.  From many + 1 to 5 many + 1
    (1,001 to 5,001) it is the slope the issue asks of idle tunnels: what
    each further port adds.  On PyPy the start-up loop passes the JIT's
    threshold once (about a thousand turns), a step of a few MiB that a
    1-port process never takes; a 1,001-port one may or may not have taken
    it, which a slope over 4,000 ports makes a small part of the figure.
    PyPy subjects also report their live heap (live_heap) from 1 to many +
    1 ports.
    """
    many = args.ports
    # Subjects that can listen on a range: proxymap's variants too, so that
    # the spread is seen with and without kept upstream connections.
    ranged = {"reference", "proxymap", "proxymap-stock", "proxymap-unkept", *PYPY_SUBJECTS}
    for name in [s for s in subjects if s in ranged]:
        started: dict[int, tuple[float, float]] = {}
        heaps: dict[int, int] = {}
        for nports in (1, many + 1):
            # Start-up time is the median of three starts (one in --quick):
            # a single start moves by a third between tries here.
            ups, rsses = [], []
            for _ in range(0 if args.quick else 2):
                t0 = time.monotonic()
                earlier = rig.start(name, nports)
                ups.append(time.monotonic() - t0)
                try:
                    rsses.append(settled_rss(earlier))
                finally:
                    earlier.stop()
            t0 = time.monotonic()
            running = rig.start(name, nports)
            ups.append(time.monotonic() - t0)
            up = statistics.median(ups)
            try:
                rsses.append(settled_rss(running))
                started[nports] = (up, statistics.median(rsses))
                if name in PYPY_SUBJECTS:
                    heaps[nports] = live_heap(running, rig.work)
                if nports == 1:
                    results.add(name, "1 port up s (process start to listening)", up)
                    continue
                results.add(name, f"{many} ports up s (process start to all listening)", up)
                per_port = (started[nports][1] - started[1][1]) / many
                results.add(name, "bytes per listening port", per_port)
                if heaps:
                    per_port = (heaps[nports] - heaps[1]) / many
                    results.add(name, "bytes per listening port, live heap", per_port)
                seconds = args.seconds
                warm(running, rig.work, many)
                rig.counts()  # start the stickiness count afresh
                # Two loads, each on one port and spread over all of them.
                # One request per connection, c32: each request a new
                # connection to the next port, whose objects (and kept
                # upstream connection) have gone cold meanwhile; the harsh
                # reading.  Keep-alive with as many connections as ports
                # (one worker per port, as proxymap is used), against as
                # many on one port: the same connections, so only what is
                # per port differs.
                loads = {
                    "one request per connection req/s": ("-c", "32"),
                    f"keep-alive req/s c{many}": ("-k", "-c", str(many)),
                }
                for _ in range(args.reps):
                    for load, options in loads.items():
                        for spread in (1, many):
                            result, cpu = measured(
                                running,
                                partial(
                                    loadgen, running, "http", seconds, *options, "-n", str(spread)
                                ),
                            )
                            label = "one port" if spread == 1 else f"{many} ports"
                            results.add(name, f"{load}, {label}", result["rate"], cpu)
                for load, prefix in zip(loads, ("", "keep-alive "), strict=True):
                    one = results.median(name, f"{load}, one port")
                    spread_rate = results.median(name, f"{load}, {many} ports")
                    assert one and spread_rate
                    results.add(
                        name, f"{prefix}traffic over {many} ports / one port", spread_rate / one
                    )
                    # The same gap as time: what spreading adds to each
                    # request.  The ratio alone favours a slow subject (a
                    # fixed cost per request is a smaller share of a longer
                    # one); this does not.
                    results.add(
                        name,
                        f"{prefix}time added per request over {many} ports us",
                        1e6 / spread_rate - 1e6 / one,
                    )
                if running.admin is not None:
                    check_stickiness(rig, running, many)
            finally:
                running.stop()
        widest = 5 * many + 1
        rsses = []
        for _ in range(1 if args.quick else 3):
            running = rig.start(name, widest)
            try:
                rsses.append(settled_rss(running))
            finally:
                running.stop()
        per_port = (statistics.median(rsses) - started[many + 1][1]) / (widest - many - 1)
        results.add(name, f"bytes per listening port, {many + 1} to {widest}", per_port)


def check_stickiness(rig: Rig, running: Running, used: int) -> None:
    """
    Traffic over ``used`` ports reached the parent as exactly ``used``
    session usernames, one per port's session; and a sample of ports, used
    one at a time, each sent only its own session's username.
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{running.admin}/sessions", timeout=10) as r:
        body = json.load(r)
    sessions = body["items"] if isinstance(body, dict) else body
    own = {s["port"]: f"{USER}-session-{s['id']}" for s in sessions}
    seen = rig.counts()
    spread_ports = range(running.port, running.port + used)
    expected = {own[p] for p in spread_ports if p in own}
    if set(seen) != expected or len(expected) != used:
        raise SystemExit(
            f"stickiness: {used} ports sent {len(seen)} usernames, "
            f"{len(set(seen) - expected)} of them not a port's own session"
        )
    opener = urllib.request.build_opener
    for port in list(spread_ports)[:: max(1, used // 20)]:
        proxy = urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{port}"})
        for _ in range(3):
            with opener(proxy).open("http://bench.parent/", timeout=10) as r:
                r.read()
        seen = rig.counts()
        if seen != {own[port]: 3}:
            raise SystemExit(f"stickiness: port {port} sent {seen}, expected {own[port]} only")
    print(json.dumps({"stickiness": "ok", "ports": used}), flush=True)


# -- the table -----------------------------------------------------------------

TARGETS = {
    "keep-alive req/s c32": "≥ 0.85x reference; ≥ squid",
    "one request per connection req/s": "≥ 0.85x reference; ≥ 1.5x pproxy",
    "CONNECT setups/s": "≥ 0.85x reference; ≥ 1.5x pproxy",
    "tunnel bulk bytes/s": "≥ 0.85x reference",
    "c1 latency p50 us": "added ≤ 1.3x reference's",
    "bytes per idle tunnel": "≤ 4 KB",
    "bytes per idle tunnel, live heap": "≤ 4 KB",
    "bytes per listening port": "≤ 2 KB",
    "bytes per listening port, 1001 to 5001": "≤ 2 KB",
    "bytes per listening port, live heap": "≤ 2 KB",
    "probe p99 with tunnels / without": "≤ 1.1",
    "traffic over 1000 ports / one port": "≥ 0.95",
    "keep-alive traffic over 1000 ports / one port": "≥ 0.95",
    "1000 ports up s (process start to all listening)": "< 1 s",
}


def table(results: Results, subjects: list[str], args: argparse.Namespace) -> str:
    metrics = list(dict.fromkeys(metric for _, metric in results.samples))
    ours = args.ours
    pairs = [(ours, s) for s in subjects if s != ours]
    if set(PYPY_SUBJECTS) <= set(subjects) and ours != "proxymap-pypy":
        # What proxymap's own code costs on PyPy, as the first pairs show on CPython.
        pairs.append(("proxymap-pypy", "reference-pypy"))
    head = ["metric", *subjects, *(f"{a} / {b}" for a, b in pairs), "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric in metrics:
        values = {s: results.median(s, metric) for s in subjects}
        cells = [metric, *(_fmt(metric, values[s]) for s in subjects)]
        for a, b in pairs:
            mine, theirs = values[a], values[b]
            # A time added can be nothing or less (noise): no ratio means anything then.
            both = mine is not None and theirs is not None and mine > 0 and theirs > 0
            cells.append(f"{mine / theirs:.2f}" if both else "")
        cells.append(TARGETS.get(metric, ""))
        lines.append("| " + " | ".join(cells) + " |")
    # The added latency (subject minus the parent alone) is what the target is about.
    direct = results.median("direct", "c1 latency p50 us")
    if direct is not None:
        added = {
            s: (results.median(s, "c1 latency p50 us") or 0) - direct
            for s in subjects
            if s != "direct"
        }
        # Against the reference on the same interpreter.
        reference = "reference-pypy" if ours in PYPY_SUBJECTS else "reference"
        if added.get(reference, 0) > 0:
            lines.append(
                f"\nAdded c1 latency (p50, minus direct-to-parent): {ours} "
                f"{added.get(ours, 0):.0f} us, {reference} {added[reference]:.0f} us "
                f"({added.get(ours, 0) / added[reference]:.2f}x)."
            )
    cpu = [
        f"{s} {statistics.median(v):.0%}"
        for (s, m), v in results.cpu.items()
        if m == "keep-alive req/s c32" and s != "direct"
    ]
    if cpu:
        lines.append("\nSubject CPU during keep-alive load (core 0): " + ", ".join(cpu) + ".")
    # A spread figure means something only if the subject was the limit on
    # one port as well: below ~97% there, the load core was.
    spread = [
        f"{s} {m} {statistics.median(v):.0%}"
        for (s, m), v in results.cpu.items()
        if m.endswith((" one port", f" {args.ports} ports"))
    ]
    if spread:
        lines.append("\nSubject CPU during the spread loads: " + ", ".join(spread) + ".")
    lines.append(
        f"\nLoads: medians of {args.reps} rounds, {args.seconds} s each; memory and "
        f"probe: one fresh process per subject, probe p99s the median of "
        f"{probe_rounds(args)} probes; subject on core 0, parent and load on core 1."
    )
    if args.subject_cpu < 1:
        lines.append(f"\nEvery subject held to {args.subject_cpu:.0%} of core 0 (--subject-cpu).")
    if args.parent != "cpython":
        lines.append(f"\nThe parent ran on {args.parent} (--parent).")
    return "\n".join(lines) + "\n"


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return ""
    if "bytes/s" in metric:
        return f"{value / 1e9:.2f} G"
    if metric.startswith("bytes") or "RSS" in metric:
        return f"{value / 1024:.1f} KiB"
    if "time added" in metric:
        return f"{value:.1f}"
    if " s" in metric and "/s" not in metric:
        return f"{value:.2f}"
    if "/" in metric and "/s" not in metric:
        return f"{value:.2f}"
    return f"{value:.0f}"


# -- main ----------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, one rep")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--subjects",
        default="reference,proxymap,pproxy,tinyproxy,squid,proxy-chain,direct",
        help="comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        # ports before memory: start-up times and the 1000-port spread are
        # measured before ~20,000 tunnel sockets are opened and closed.
        # (The 0.9-1.15 s start-ups seen after either phase were mostly the
        # harness reading /proc/net/tcp on the subject's core: see
        # common.listening.)
        "--phases",
        default="throughput,ports,memory",
        help="comma-separated phases to run",
    )
    parser.add_argument(
        # The parent shares core 1 with the load: is its share what limits a
        # fast subject?  (Run AI: no, loadgen's and the kernel's is.)
        "--parent",
        choices=("cpython", "pypy"),
        default="cpython",
        help="the interpreter the fake parent runs on (default: %(default)s)",
    )
    parser.add_argument(
        "--subject-cpu",
        type=float,
        default=1.0,
        help="hold each subject to this share of its core (cgroup; see CpuCap)",
    )
    parser.add_argument(
        "--ours",
        choices=("proxymap", "proxymap-pypy"),
        default="proxymap",
        help="the subject the table's ratios are for (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    subjects = args.subjects.split(",")
    known = {"reference", "proxymap", "proxymap-stock", "proxymap-unkept", "direct", *PEERS}
    known |= set(PYPY_SUBJECTS)
    if not set(subjects) <= known or args.ours not in subjects:
        parser.error(f"--subjects: {args.ours} (--ours) and any of {sorted(known)}")
    if not 0 < args.subject_cpu <= 1:
        parser.error("--subject-cpu: a share of one core, above 0 and at most 1")
    args.tunnels = (1000, 5000)
    args.ports = 1000
    if args.quick:
        args.seconds, args.reps, args.tunnels, args.ports = 1, 1, (50, 200), 50
    install(subjects, args.parent)
    # The harness itself (waiting for listeners, reading results) stays off
    # the subject's core too.
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    results = Results(args.out / f"run-{stamp}.jsonl")
    work = Path(tempfile.mkdtemp(prefix="proxymap-bench-"))
    cap = CpuCap(args.subject_cpu) if args.subject_cpu < 1 else None
    try:
        rig = Rig(work, str(PYPY) if args.parent == "pypy" else sys.executable, cap)
    except BaseException:
        if cap is not None:
            cap.close()
        raise
    try:
        phases = {"throughput": throughput, "memory": memory, "ports": ports}
        for phase in args.phases.split(","):
            phases[phase](rig, results, subjects, args)
    finally:
        rig.close()
        shutil.rmtree(work, ignore_errors=True)
    text = table(results, subjects, args)
    (args.out / f"run-{stamp}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
