"""`neon-ray review` on outputs it can only partly read: one written by an older neon-ray (no MLflow record,
no alias), a folder with no run at all, and `--ui` serving a copy of a local record on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from _servers import free_port
from _support import ROOT, cli_env, neon_ray_inprocess, tiny_config


def _older_output(out):
    """The files an older neon-ray left: a tune manifest without registered alias or model URI, a summary, no
    mlflow.json (its store was in the driver's ~/.cache)."""
    trials = [
        {"w": 0.5, "key": "w=0.5", "sampler": {}, "rungs_scored": 2, "fid": 90.0, "n": 40,
         "fid_by_n": {"20": 120.0, "40": 90.0}},
        {"w": 1.0, "key": "w=1", "sampler": {}, "rungs_scored": 1, "fid": 130.0, "n": 20, "fid_by_n": {"20": 130.0}},
    ]
    tune = {"stage": "tune", "config_hash": "abc", "wall_seconds": 12.5, "neon_ray_version": "0.0.9",
            "metrics": {"best_w": 0.5, "best_sampler": {}, "best_fid": 90.0, "best_n": 40, "trials": trials},
            "params": {"rungs": [20, 40], "search": "grid", "registered_model": "neon-x", "registered_version": "3"},
            "outputs": {"best_model": "tune/trials/w=0.5/model.safetensors"}}
    (out / "tune").mkdir(parents=True)
    (out / "tune" / "manifest.json").write_text(json.dumps(tune))
    (out / "summary.json").write_text(json.dumps({"fid_base": 100.0, "fid_neon": 90.0, "best_w": 0.5, "best_sampler": {},
                                                  "n_eval": 40, "registered_model": {"model": "neon-x", "version": "3"}}))


def test_an_older_output_is_reviewed_as_far_as_it_goes(tmp_path):
    out = tmp_path / "old"
    _older_output(out)
    proc = neon_ray_inprocess("review", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1  # one single-line JSON object
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["parent_run_id"] is None and record["stages"]["tune"]["seconds"] == 12.5
    first, second = record["trials"]
    assert (first["status"], first["rung"], first["winner"], first["fid"]) == ("completed", 40, True, {"20": 120.0, "40": 90.0})
    assert (second["status"], second["rung"], second["winner"]) == ("stopped", 20, False)
    assert first["params"] == {"w": 0.5} and first["grid"] is None and first["run_id"] is None
    assert record["headline"]["fid_neon"] == 90.0 and record["registered_model"]["version"] == "3"
    assert any("no MLflow record" in m for m in record["missing"]), record["missing"]

    text = neon_ray_inprocess("review", str(out))
    assert text.returncode == 0 and "stopped@20" in text.stdout and "winner" in text.stdout and "missing:" in text.stdout, text.stdout


def test_an_older_remote_output_says_where_its_record_was(tmp_path):
    """Before the record moved to the output, a remote output's sqlite store stayed in the driver's ~/.cache."""
    out = tmp_path / "old-remote"
    _older_output(out)
    (out / "mlflow.json").write_text(json.dumps({"parent_run_id": "0123", "experiment_id": "1", "store": "external",
                                                 "tracking_uri": "sqlite:////home/driver/.cache/neon-ray/mlflow.db"}))
    proc = neon_ray_inprocess("review", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["parent_run_id"] == "0123" and len(record["trials"]) == 2
    assert any("/home/driver/.cache/neon-ray/mlflow.db on the machine that ran it" in m for m in record["missing"]), record["missing"]


def test_a_folder_without_a_run_is_one_line(tmp_path):
    proc = neon_ray_inprocess("review", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no neon-ray output" in proc.stderr, proc.stderr


def test_review_ui_serves_a_copy_of_the_record_on_loopback(tmp_path, monkeypatch):
    from neon_ray.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    tracker = Tracker(tiny_config(out))
    tracker.open()
    tracker.close(ok=True)
    before = (out / "mlflow.db").read_bytes()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "neon_ray", "review", str(out), "--ui", "--port", str(port)], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, answered = time.time() + 480, False  # mlflow ui starts in ~15 s; minutes on a crowded machine
        while time.time() < deadline and not answered and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    answered = resp.read().strip() == b"OK"
            except OSError:
                time.sleep(0.5)
        assert answered, proc.stdout.read() if proc.poll() is not None else "no answer"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
    assert (out / "mlflow.db").read_bytes() == before  # a copy was served; the record itself untouched
