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
