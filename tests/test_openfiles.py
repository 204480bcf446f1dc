"""
The open-file limit: raised to the hard limit, and the limits fitted to it.
"""

from __future__ import annotations

import resource

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxymap.config import Limits
from proxymap.ops.openfiles import RESERVE, TooFewOpenFiles, connection_room, fit, raise_limit

INFINITY = resource.RLIM_INFINITY


class FakeLimits:
    """
    ``getrlimit``/``setrlimit`` over one limit, refusing soft limits above ``cap``.
    """

    def __init__(self, soft: int, hard: int, cap: float = float("inf")) -> None:
        self.soft, self.hard, self.cap = soft, hard, cap
        self.asked: list[int] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        soft, hard = limits
        assert hard == self.hard  # never lowered, never raised
        self.asked.append(soft)
        if soft == INFINITY or soft > self.cap:
            raise ValueError("not allowed")
        self.soft = soft

    def raise_limit(self) -> int:
        return raise_limit(self.getrlimit, self.setrlimit)


def test_the_soft_limit_goes_up_to_the_hard_one() -> None:
    fake = FakeLimits(1024, 524288)
    assert fake.raise_limit() == 524288
    assert fake.soft == 524288


def test_a_soft_limit_at_the_hard_one_is_left_alone() -> None:
    fake = FakeLimits(20000, 20000)
    assert fake.raise_limit() == 20000
    assert fake.asked == []


def test_an_infinite_hard_limit_settles_for_what_the_system_allows() -> None:
    fake = FakeLimits(1024, INFINITY, cap=1 << 20)  # Linux's fs.nr_open
    assert fake.raise_limit() == 1 << 20
    fake = FakeLimits(256, INFINITY, cap=100_000)
    assert fake.raise_limit() == 1 << 16
    assert fake.asked == [INFINITY, 1 << 20, 1 << 16]


def test_a_refused_raise_keeps_the_soft_limit() -> None:
    fake = FakeLimits(1024, 4096, cap=1024)
    assert fake.raise_limit() == 1024
    assert fake.soft == 1024


def test_limits_the_open_files_hold_are_kept() -> None:
    limits = Limits(max_connections=100)
    assert fit(limits, 10, 10 + RESERVE + 200) == (limits, None)


def test_max_connections_is_lowered_to_what_the_open_files_hold() -> None:
    limits, warning = fit(Limits(max_connections=9000), 1000, 1024 + RESERVE + 1000)
    assert limits == Limits(max_connections=512)
    assert warning is not None
    assert warning.startswith(
        f"the open-file limit ({1088 + 1000}) holds 1000 ports and 512 connections, "
        "not max_connections = 9000 (each takes up to 2)"
    )
    assert "LimitNOFILE=" in warning and "[limits] max_connections" in warning


def test_the_demo_counts_four_descriptors_a_connection() -> None:
    limits, _ = fit(Limits(), 10, 10 + RESERVE + 400, per_connection=4)
    assert limits.max_connections == 100


@pytest.mark.parametrize(("ports", "open_files"), [(1000, 1024), (10, 10 + RESERVE + 1)])
def test_too_few_open_files_for_the_ports(ports: int, open_files: int) -> None:
    with pytest.raises(TooFewOpenFiles) as e:
        fit(Limits(), ports, open_files)
    assert str(e.value).startswith(f"the open-file limit ({open_files}) cannot hold {ports} ports")


@given(
    st.integers(1, 10_000),
    st.integers(1, 100_000),
    st.integers(0, 200_000),
    st.sampled_from([2, 4]),
)
def test_what_is_fitted_fits(ports: int, max_connections: int, open_files: int, per: int) -> None:
    try:
        limits, warning = fit(Limits(max_connections=max_connections), ports, open_files, per)
    except TooFewOpenFiles:
        assert connection_room(open_files, ports, per) < 1
        return
    assert 1 <= limits.max_connections <= max_connections
    assert ports + RESERVE + per * limits.max_connections <= open_files
    assert (warning is None) == (limits.max_connections == max_connections)
