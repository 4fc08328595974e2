"""`ray job submit` against a real head started on this machine (named zz: runs last, it starts its own cluster)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _support import ROOT
from test_e2e import check_mlflow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cluster(temp_dir: str) -> None:
    """Stop only this test's head (processes whose command line names its temp dir), not other Rays."""
    out = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True)
    for pid in out.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@pytest.mark.slow
def test_ray_job_submit_end_to_end(tmp_path):
    bin_dir = Path(sys.executable).parent
    ray = str(bin_dir / "ray")
    # Ray's token authentication, as on a real cluster: one secret shared by the head and the submitter.
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    temp_dir = tempfile.mkdtemp(prefix="nrj-", dir="/tmp")
    port, dash = _free_port(), _free_port()
    # Every port of this head is a free one: another Ray on the machine (the session's `ray_local`, a
    # developer's) holds the defaults, e.g. the dashboard agent's 52365, and the job agent would never start.
    ports = [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "runtime-env-agent-port", "metrics-export-port",
                                                     "ray-client-server-port", "node-manager-port", "object-manager-port")]
    start = subprocess.run([ray, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                            "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats", *ports],
                           capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        out = tmp_path / "job"
        submit = [ray, "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={ROOT}", "--",
                  "python", "jobs/neon_job.py", "jobs/configs/tiny.yaml", "--output", str(out)]
        for _ in range(24):  # the head's job agent takes a few seconds to come up after `ray start`
            job = subprocess.run(submit, capture_output=True, text=True, env=env, timeout=1500)
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "succeeded" in job.stdout.lower()
        summary = json.loads((out / "summary.json").read_text())
        assert {"fid_base", "fid_neon", "best_w"} <= set(summary)
        check_mlflow(out)
    finally:
        _kill_cluster(temp_dir)
