"""
The shipped systemd unit is one systemd itself accepts.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "examples" / "proxymap.service"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (.ci/run installs the systemd package)")
    # verify checks that ExecStart exists: point it at this environment's twist.
    twist = Path(sys.executable).parent / "twist"
    unit = tmp_path / "proxymap.service"
    unit.write_text(UNIT.read_text().replace("/opt/proxymap/bin/twist", str(twist)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        # Outside a booted systemd some checks cannot run at all; those are not ours.
        if "proxymap.service" in line
    ]
    assert result.returncode == 0 and problems == [], result.stdout + result.stderr


def test_unit_settings() -> None:
    text = UNIT.read_text()
    for setting in (
        "Type=notify",
        "--log-format=text proxymap",
        "Restart=on-failure",
        "LimitNOFILE=",
        "ExecReload=/opt/proxymap/bin/twist proxymap --config /etc/proxymap/proxymap.toml --check",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "StateDirectory=proxymap",
        "CapabilityBoundingSet=",
        "User=proxymap",
    ):
        assert setting in text, setting
