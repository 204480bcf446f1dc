"""
The built package: what the wheel holds, and that Twisted finds the plugin
after ``pip install`` and ``pip install -e`` in a fresh virtualenv, run from
outside the repository (so the source tree cannot stand in for the install).
"""

from __future__ import annotations

import platform
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.packaging


def run(*argv: str | Path, cwd: Path) -> str:
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_wheel_and_editable_install(tmp_path: Path) -> None:
    run(sys.executable, "-m", "build", "--wheel", "--outdir", tmp_path / "dist", ROOT, cwd=ROOT)
    (wheel,) = (tmp_path / "dist").glob("proxymap-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/proxymap_plugin.py" in names
    assert "proxymap/tap.py" in names
    assert "proxymap/dataplane/server.py" in names
    assert "proxymap/sandbox/vendor.py" in names
    # Shipping either of these would overwrite Twisted's own on install.
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not any(n.startswith("tests/") for n in names)
    assert not any(n.endswith("dropin.cache") for n in names)

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    pip, twistd = venv / "bin" / "pip", venv / "bin" / "twistd"
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    # cryptography >= 44 has no PyPy 3.9 wheel, and building it needs
    # crates.io (README, "Running on PyPy").
    binary = ["--only-binary=cryptography"] if platform.python_implementation() == "PyPy" else []
    run(pip, "install", "--quiet", *binary, wheel, cwd=outside)
    assert "proxymap" in run(twistd, "--help", cwd=outside)
    assert "--demo" in run(venv / "bin" / "twist", "proxymap", "--help", cwd=outside)

    run(pip, "uninstall", "--yes", "--quiet", "proxymap", cwd=outside)
    # Uninstalling proxymap must leave Twisted's own plugins package intact.
    assert list(venv.glob("lib/*/site-packages/twisted/plugins/__init__.py"))
    run(pip, "install", "--quiet", *binary, "-e", ROOT, cwd=outside)
    assert "proxymap" in run(twistd, "--help", cwd=outside)
