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
    its sample grid; the tune stage's run holds the trial table. Live metrics from another process reach a run."""
    import pickle

    tracker = _tracker(tmp_path / "out", monkeypatch)
    stage = tracker.start_stage("tune", "abc123")
    for key in ("w=0.5", "w=1"):
        tracker.start_child(f"trial {key}", parent=stage, tags={"stage": "tune-trial", "trial_id": key, "trial_key": key})
    rows = [{"key": "w=0.5", "w": 0.5, "sampler": {}, "fid_by_n": {"200": 30.0, "1000": 25.0}},
            {"key": "w=1", "w": 1.0, "sampler": {}, "fid_by_n": {"200": 40.0}}]
    grid = tmp_path / "samples.png"
    grid.write_bytes(b"\x89PNG not really")
    tracker.annotate_trials(stage, rows, [200, 1000], "w=0.5", {"w=0.5": str(grid)})
    runs = {r.data.tags["trial_key"]: r for r in tracker.client.search_runs([tracker.experiment_id], "tags.stage = 'tune-trial'")}
    assert {k: (r.data.tags["trial.status"], r.data.tags["trial.rung"], r.data.tags["trial.winner"]) for k, r in runs.items()} == {
        "w=0.5": ("completed", "1000", "true"), "w=1": ("stopped", "200", "false")}
    assert [a.path for a in tracker.client.list_artifacts(runs["w=0.5"].info.run_id)] == ["samples.png"]
    import json

    table = json.loads(open(tracker.client.download_artifacts(stage, "trials.json", str(tmp_path))).read())
    rows_back = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(r["key"], r["fid_n1000"], r["rung"], r["winner"]) for r in rows_back] == [("w=0.5", 25.0, 1000, True), ("w=1", None, 200, False)]

    sink = pickle.loads(pickle.dumps(tracker.live_metrics(stage)))  # as Ray Train's controller receives it
    for step in (10, 20):
        sink({"loss": 1.0 / step, "lr": 1e-4}, step)
    assert [m.step for m in tracker.client.get_metric_history(stage, "loss")] == [10, 20]
