"""Helpers shared by the tests (importable thanks to `pythonpath = ["tests"]` in pyproject)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"


def tiny_config(output: Path, *overrides: str):
    from neon_ray.config import load_config

    return load_config(TINY, list(overrides), str(output))


def neon_ray_cli(*args: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script as a user would."""
    exe = Path(sys.executable).with_name("neon-ray")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})
