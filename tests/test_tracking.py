"""The MLflow layer on a real sqlite store: an interrupted stage or trial that is resumed logs into the run it
started (a stopped and resubmitted job shows each stage and trial once); a stage run again after it finished gets
a run of its own."""

from __future__ import annotations

from _support import tiny_config


def _tracker(out, monkeypatch):
    from neon_ray.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(tiny_config(out))
    tracker.open()
    return tracker


def test_an_interrupted_stage_and_trial_resume_their_runs(tmp_path, monkeypatch):
    first = _tracker(tmp_path / "out", monkeypatch)
    stage = first.start_stage("tune", "abc123")
    trial = first.start_child("trial w=0.5", parent=stage, tags={"stage": "tune-trial", "trial_id": "t_00001"})
    first.log_metrics(trial, {"fid": 12.5}, step=100)
    first.end_child(stage, ok=False)  # the driver was stopped mid-search
    first.close(ok=False)

    again = _tracker(tmp_path / "out", monkeypatch)  # the resubmitted command: a new process, the same output
    assert again.parent_id == first.parent_id
    resumed = again.start_stage("tune", "abc123")
    assert resumed == stage and again.client.get_run(stage).info.status == "RUNNING"
    assert again.find_child(resumed, {"stage": "tune-trial", "trial_id": "t_00001"}) == trial
    assert again.find_child(resumed, {"stage": "tune-trial", "trial_id": "t_00002"}) is None
    assert again.start_stage("generate", "abc123") != stage  # another stage: its own run

    other = again.start_stage("tune", "def456")  # another config of the stage: its own run
    assert other != stage
    again.end_child(resumed, ok=True)
    assert again.start_stage("tune", "abc123") not in (stage, other)  # finished, then forced again: a new run


def test_a_trial_rerun_after_it_finished_reopens_its_run(tmp_path, monkeypatch):
    """A trial that completed after Tune last saved its experiment state is run again by Tuner.restore: it must
    log into the run it finished, not a second run of the same trial id (the job-stop test saw 3 runs, 2 ids)."""
    first = _tracker(tmp_path / "out", monkeypatch)
    stage = first.start_stage("tune", "abc123")
    tags = {"stage": "tune-trial", "trial_id": "t_00000"}
    trial = first.resume_child("trial w=0.5", stage, tags, key=("stage", "trial_id"), unfinished=False)
    first.end_child(trial, ok=True)  # the trial completed, then the job was stopped
    first.close(ok=False)

    again = _tracker(tmp_path / "out", monkeypatch)
    rerun = again.resume_child("trial w=0.5", again.start_stage("tune", "abc123"), tags, key=("stage", "trial_id"), unfinished=False)
    assert rerun == trial and again.client.get_run(trial).info.status == "RUNNING"
    trials = again.client.search_runs([again.experiment_id], "tags.stage = 'tune-trial'")
    assert [r.info.run_id for r in trials] == [trial]


def test_a_search_reads_as_a_table_of_trials_at_equal_n(tmp_path, monkeypatch):
    """After a search each trial run says how it ended (completed or stopped, at which n, winner or not) and carries
    its sample grid and its score at every rung, also a trial whose run was never made while it ran (the server did
    not answer then); the tune stage's run holds the trial table. Live metrics from another process reach a run."""
    import pickle

    tracker = _tracker(tmp_path / "out", monkeypatch)
    stage = tracker.start_stage("tune", "abc123")
    for key in ("w=0.5", "w=1"):
        tracker.start_child(f"trial {key}", parent=stage, tags={"stage": "tune-trial", "trial_id": key, "trial_key": key})
    rows = [{"key": "w=0.5", "w": 0.5, "sampler": {}, "fid_by_n": {"200": 30.0, "1000": 25.0}},
            {"key": "w=1", "w": 1.0, "sampler": {}, "fid_by_n": {"200": 40.0}},
            {"key": "w=2,guidance=3", "w": 2.0, "sampler": {"guidance": 3.0}, "fid_by_n": {"200": 50.0}, "precision": 0.5}]
    grid = tmp_path / "samples.png"
    grid.write_bytes(b"\x89PNG not really")
    tracker.annotate_trials(stage, rows, [200, 1000], "w=0.5", {"w=0.5": str(grid)})
    runs = {r.data.tags["trial_key"]: r for r in tracker.client.search_runs([tracker.experiment_id], "tags.stage = 'tune-trial'")}
    assert {k: (r.data.tags["trial.status"], r.data.tags["trial.rung"], r.data.tags["trial.winner"]) for k, r in runs.items()} == {
        "w=0.5": ("completed", "1000", "true"), "w=1": ("stopped", "200", "false"), "w=2,guidance=3": ("stopped", "200", "false")}
    assert runs["w=0.5"].data.metrics["fid_n200"] == 30.0 and runs["w=0.5"].data.metrics["fid_n1000"] == 25.0
    lost = runs["w=2,guidance=3"]
    assert lost.data.params == {"w": "2.0", "sampler.guidance": "3.0"} and lost.info.status == "FINISHED"
    assert lost.data.metrics["fid_n200"] == 50.0 and lost.data.metrics["precision_n200"] == 0.5
    assert [a.path for a in tracker.client.list_artifacts(runs["w=0.5"].info.run_id)] == ["samples.png"]
    import json

    table = json.loads(open(tracker.client.download_artifacts(stage, "trials.json", str(tmp_path))).read())
    rows_back = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(r["key"], r["fid_n1000"], r["rung"], r["winner"]) for r in rows_back] == [
        ("w=0.5", 25.0, 1000, True), ("w=1", None, 200, False), ("w=2,guidance=3", None, 200, False)]

    sink = pickle.loads(pickle.dumps(tracker.live_metrics(stage)))  # as Ray Train's controller receives it
    for step in (10, 20):
        sink({"loss": 1.0 / step, "lr": 1e-4}, step)
    assert [m.step for m in tracker.client.get_metric_history(stage, "loss")] == [10, 20]


def _manifest(stage: str, **metrics):
    from neon_ray.manifest import Manifest

    return Manifest(stage=stage, config_hash="abc123", metrics=metrics, wall_seconds=1.5)


def test_a_remote_output_keeps_its_whole_record_and_a_new_machine_resumes_it(s3_server, tmp_path, monkeypatch):
    """No tracking server: the artifacts go straight to <output>/mlartifacts, the sqlite store is uploaded to
    <output>/mlflow.db at each stage end and on exit; a driver with an empty home folder resumes the same parent."""
    from _servers import BUCKET

    from neon_ray.tracking import Tracker, working_copy_dir

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "laptop-1"))
    output = f"s3://{BUCKET}/unit-record/out"
    first = Tracker(tiny_config(output))
    first.open()
    stage = first.start_stage("generate", "abc123")
    first.finish_stage(stage, _manifest("generate", n_synthetic=60))
    fs, root = s3_server.filesystem(), f"{BUCKET}/unit-record/out"
    assert fs.exists(f"{root}/mlflow.db") and fs.exists(f"{root}/mlflow.lease")  # uploaded at the stage end
    first.close(ok=True)
    keys = fs.find(root)
    assert f"{root}/mlflow.lease" not in keys
    assert any(k.startswith(f"{root}/mlartifacts/") and k.endswith("/manifest.json") for k in keys), keys
    assert any(k.endswith("/config.yaml") for k in keys)
    assert not [k for k in keys if ".tmp-" in k]
    assert str(working_copy_dir(output)).startswith(str(tmp_path / "laptop-1"))

    monkeypatch.setenv("HOME", str(tmp_path / "laptop-2"))  # another machine: nothing of the record on it
    again = Tracker(tiny_config(output))
    again.open()
    assert again.parent_id == first.parent_id
    run = again.client.get_run(again.find_child(None, {"stage": "generate"}))
    assert run.info.status == "FINISHED" and run.data.metrics["n_synthetic"] == 60
    assert [a.path for a in again.client.list_artifacts(run.info.run_id)] == ["manifest.json"]
    again.close(ok=True)


def test_a_second_driver_on_one_output_is_refused_until_the_lease_expires(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys
    import time

    import pytest

    from neon_ray.errors import NeonError
    from neon_ray.tracking import LEASE_FILE, Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    out.mkdir()
    lease = out / LEASE_FILE
    other = {"host": "another-machine", "pid": 4242, "id": "someone-else", "expires": time.time() + 300}
    lease.write_text(json.dumps(other))
    with pytest.raises(NeonError) as refused:
        Tracker(tiny_config(out)).open()
    message = str(refused.value)
    assert "\n" not in message and "another neon-ray driver (host another-machine, pid 4242)" in message and str(out) in message
    assert json.loads(lease.read_text()) == other  # nothing taken

    lease.write_text(json.dumps(other | {"expires": time.time() - 1}))  # expired: taken over
    tracker = Tracker(tiny_config(out))
    tracker.open()
    assert json.loads(lease.read_text())["id"] != "someone-else"
    tracker.close(ok=True)
    assert not lease.exists()

    # A driver killed on this machine: its rerun takes over at once, without waiting for the lease to expire.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    import socket

    lease.write_text(json.dumps(other | {"host": socket.gethostname(), "pid": int(dead.stdout)}))
    tracker = Tracker(tiny_config(out))
    tracker.open()
    tracker.close(ok=True)


def test_a_tracking_server_that_stops_answering_costs_one_warning(tmp_path, monkeypatch, caplog):
    """The run goes on while the server is down; the stages that finished meanwhile are logged at the next stage
    end that reaches it."""
    import logging

    from _servers import free_port, start_mlflow

    from neon_ray.tracking import Tracker

    for k, v in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = free_port()
    server = start_mlflow(tmp_path / "server", port=port)
    try:
        tracker = Tracker(tiny_config(tmp_path / "out", f"mlflow.tracking_uri={server.url}"))
        tracker.open()
        generate = tracker.start_stage("generate", "abc123")
        server.stop()
        with caplog.at_level(logging.WARNING, logger="neon_ray"):
            tracker.log_metrics(generate, {"progress": 0.5})
            tracker.finish_stage(generate, _manifest("generate", n_synthetic=60))
            finetune = tracker.start_stage("finetune", "abc123")
            assert finetune is None
            server = start_mlflow(tmp_path / "server", port=port)  # back, with the same store
            tracker.finish_stage(finetune, _manifest("finetune", finetune_images=320))
            tracker.close(ok=True)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "stopped answering" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
        runs = tracker.client.search_runs([tracker.experiment_id])
        stages = {r.data.tags.get("stage"): r for r in runs}
        assert stages["generate"].info.run_id == generate and stages["generate"].data.metrics["n_synthetic"] == 60
        assert stages["finetune"].data.metrics["finetune_images"] == 320
        assert all(r.info.status == "FINISHED" for r in runs)
    finally:
        server.stop()
