"""
The harness's ratio table (``bench/run.py``): what it writes from samples.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from pathlib import Path
from types import ModuleType

import pytest

# The harness is a CPython 3.11 program (it measures PyPy as a subject).
pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 11) or platform.python_implementation() != "CPython",
    reason="bench/run.py runs on CPython 3.11+",
)

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    # run.py puts bench/ first on the path for its sibling modules; take it off.
    sys.path.remove(str(BENCH))
    return module


def rows(run: ModuleType, tmp_path: Path, samples: dict[tuple[str, str], float]) -> list[str]:
    results = run.Results(tmp_path / "out.jsonl")
    for (subject, metric), value in samples.items():
        results.add(subject, metric, value)
    args = argparse.Namespace(
        ours="proxymap",
        reps=1,
        seconds=5,
        subject_cpu=1.0,
        parent="cpython",
        ports=1000,
        quick=False,
    )
    text = run.table(results, ["reference", "proxymap"], args)
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_a_ratio_of_positive_figures(run: ModuleType, tmp_path: Path) -> None:
    table = rows(
        run,
        tmp_path,
        {
            ("reference", "keep-alive req/s c32"): 40000,
            ("proxymap", "keep-alive req/s c32"): 50000,
        },
    )
    assert (
        table[1] == "| keep-alive req/s c32 | 40000 | 50000 | 1.25 | ≥ 0.85x reference; ≥ squid |"
    )


def test_no_ratio_of_a_time_added_that_is_nothing_or_less(run: ModuleType, tmp_path: Path) -> None:
    metric = "keep-alive time added per request over 1000 ports us"
    table = rows(
        run,
        tmp_path,
        {("reference", metric): -0.1, ("proxymap", metric): 0.85},
    )
    assert table[1] == f"| {metric} | -0.1 | 0.8 |  |  |"
