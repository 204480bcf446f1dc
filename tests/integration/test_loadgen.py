"""
The harness's load tool (``bench/loadgen.c``), built with gcc, against small
servers on 127.0.0.1: what it counts as an answer, an error, or a
keep-alive connection the server ended between answers.
"""

from __future__ import annotations

import json
import shutil
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc"),
]

SOURCE = Path(__file__).resolve().parents[2] / "bench" / "loadgen.c"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("loadgen") / "loadgen"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(SOURCE)], check=True)
    return binary


class _Handler(socketserver.BaseRequestHandler):
    #: What the server does after each request head: "keep" answers and
    #: keeps the connection, "close" answers and closes it, "cut" sends half
    #: an answer and closes.
    behaviour = "keep"

    def handle(self) -> None:
        pending = b""
        for _ in range(100_000):  # bounded: far more requests than a test sends
            while b"\r\n\r\n" not in pending:
                data = self.request.recv(4096)
                if not data:
                    return
                pending += data
            _, _, pending = pending.partition(b"\r\n\r\n")
            if self.behaviour == "cut":
                self.request.sendall(ANSWER[:-1])
                return
            self.request.sendall(ANSWER)
            if self.behaviour == "close":
                return


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[int]:
    handler = type("Handler", (_Handler,), {"behaviour": request.param})
    with _Server(("127.0.0.1", 0), handler) as srv:
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        try:
            yield srv.server_address[1]
        finally:
            srv.shutdown()
            thread.join(timeout=10)


def run(loadgen: Path, port: int) -> dict[str, float]:
    argv = [str(loadgen), "http", str(port), "-c", "1", "-k", "-l", "-d", "0.5", "-w", "0.1"]
    out = subprocess.run(
        [*argv, "-s", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


@pytest.mark.parametrize("server", ["keep"], indirect=True)
def test_keep_alive_answers_on_one_connection(loadgen: Path, server: int) -> None:
    result = run(loadgen, server)
    assert result["ops"] > 0
    assert (result["errors"], result["reopened"]) == (0, 0)
    assert result["p99_us"] > 0


@pytest.mark.parametrize("server", ["close"], indirect=True)
def test_a_server_ending_keep_alive_between_answers_is_not_an_error(
    loadgen: Path, server: int
) -> None:
    result = run(loadgen, server)
    assert result["ops"] > 0
    assert result["errors"] == 0
    # Every answer ended its connection; the one in flight at the end may not count.
    assert result["ops"] - 1 <= result["reopened"] <= result["ops"] + 1


@pytest.mark.parametrize("server", ["cut"], indirect=True)
def test_an_answer_cut_short_is_an_error(loadgen: Path, server: int) -> None:
    result = run(loadgen, server)
    assert result["ops"] == 0
    assert result["errors"] > 0
    assert result["reopened"] == 0
