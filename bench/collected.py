"""
Run a Python subject so that the harness can ask it what its live objects
take: on SIGUSR2 it runs a full collection and writes, as JSON, its RSS and
(on PyPy) its garbage collector's heap to ``$BENCH_HEAP_DIR/<pid>.json``.

    python bench/collected.py -m twisted proxymap --config c.toml
    python bench/collected.py bench/reference.py 10201 1 ...

Why: on PyPy, RSS does not follow what a process keeps.  Its collector
lets the heap grow to ~1.8x what the last full collection kept before it
collects again, memory freed in a collection is not all given back to the
system, and the JIT's compiling leaves its own high-water mark.
So an RSS slope between 1,000 and 5,000 tunnels reads 0 after warm-up (the
heap already had room) and 4 KiB on a fresh process (garbage not yet
collected).  What the tunnels keep alive is the heap after a full
collection: ``total_gc_memory`` (arenas, objects allocated outside them,
and the nursery), read before and after.  On CPython, reference counting
frees objects as they die and a collection changes RSS by nothing
measurable, so the harness runs CPython subjects without this.

This runs on the subject's interpreter, PyPy 3.9 included.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import signal
import sys
from types import FrameType
from typing import Any


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def collected() -> dict[str, Any]:
    """
    A full collection, then what is left.
    """
    gc.collect()
    gc.collect()  # what the first one's finalizers let go
    found: dict[str, Any] = {"rss": rss_bytes(), "heap": None}
    if sys.implementation.name == "pypy":
        # gc.get_stats() formats its figures ("2.4MB"); ._s has the numbers.
        found["heap"] = gc.get_stats()._s.total_gc_memory  # type: ignore[attr-defined]
    return found


def answer(signum: int, frame: FrameType | None) -> None:
    path = os.path.join(os.environ["BENCH_HEAP_DIR"], f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(collected(), f)
    os.replace(path + ".tmp", path)  # the harness never reads half a file


def main() -> None:
    signal.signal(signal.SIGUSR2, answer)
    if sys.argv[1] == "-m":
        sys.argv = [sys.argv[2], *sys.argv[3:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
