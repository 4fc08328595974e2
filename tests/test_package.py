"""The package as users get it: its version, the shipped configs by name, and what the wheel carries."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from _support import ROOT, neon_ray_inprocess

import neon_ray


def test_version_matches_the_installed_metadata():
    out = subprocess.run([sys.executable, "-m", "neon_ray", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"neon-ray {neon_ray.__version__}", out.stdout + out.stderr
    try:
        assert importlib.metadata.version("neon-ray") == neon_ray.__version__
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("neon-ray is on the path but not installed (scripts/setup_env.sh installs it)")


def test_configs_lists_every_shipped_config_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = neon_ray_inprocess("configs")
    assert proc.returncode == 0, proc.stderr
    names = {line.split()[0] for line in proc.stdout.splitlines()[1:]}
    assert names == {p.stem for p in (ROOT / "neon_ray" / "configs").glob("*.yaml")}
    assert "quickstart" in names and "tiny" in names
