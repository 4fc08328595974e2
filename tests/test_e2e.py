"""`neon-ray run` end to end on the tiny config: summary, MLflow (one parent per output, the registered model),
skip on rerun, a single-stage command in the same parent, a changed w grid, a copied output rerun in place,
and quiet logs when nobody is watching a terminal."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from _support import TINY, load_and_predict, neon_ray_cli, without_checkout

SUMMARY_FIELDS = ("fid_base", "fid_neon", "best_w", "guidance", "sampler", "base_class_consistency", "n_synthetic",
                  "finetune_images", "extra_compute_fraction", "stage_seconds", "trials", "registered_model")
STAGES = ("pretrain", "generate", "finetune", "evaluate", "tune")


def mlflow_runs(output):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output}/mlflow.db")
    exp = client.get_experiment_by_name("neon-ray")
    return client, client.search_runs([exp.experiment_id])


def check_mlflow(output, expected_stages=STAGES, min_trials=2) -> None:
    """One parent run for the output, a child per stage, the trials under the tune stage's run, plots and config."""
    client, runs = mlflow_runs(output)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    assert json.loads((Path(output) / "mlflow.json").read_text())["parent_run_id"] == parent.info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # Each stage once: a stage that was interrupted and resumed (a stopped job, resubmitted) reopens its run.
    assert sorted(r.data.tags.get("stage") for r in children) == sorted(expected_stages)
    tune_run = next(r for r in children if r.data.tags["stage"] == "tune")
    trials = [r for r in runs if r.data.tags.get("stage") == "tune-trial"]
    # FID under a key per sample count (views compare trials at equal n only), never one key mixing rungs.
    assert len(trials) >= min_trials and all(any(k.startswith("fid_n") for k in r.data.metrics) and "fid" not in r.data.metrics
                                    and r.data.tags["mlflow.parentRunId"] == tune_run.info.run_id for r in trials), \
        [(r.info.run_name, r.info.status, sorted(r.data.metrics), r.data.tags["mlflow.parentRunId"] == tune_run.info.run_id) for r in trials]
    assert len({r.data.tags["trial_id"] for r in trials}) == len(trials)  # a resumed trial too
    # Each trial says how it ended and where; one is the winner; each has its sample grid; the table is on the stage.
    assert all(r.data.tags.get("trial.status") in ("completed", "stopped") and f"fid_n{r.data.tags['trial.rung']}" in r.data.metrics
               for r in trials), [sorted(r.data.tags) for r in trials]
    assert [r.data.tags["trial.winner"] for r in trials].count("true") == 1
    assert all("samples.png" in {a.path for a in client.list_artifacts(r.info.run_id)} for r in trials)
    assert "trials.json" in {a.path for a in client.list_artifacts(tune_run.info.run_id)}
    assert any(k.startswith("system/") for k in tune_run.data.metrics), sorted(tune_run.data.metrics)  # MLflow's system metrics
    assert "fid_base" in parent.data.metrics and "fid_neon" in parent.data.metrics
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/samples_base_vs_neon.png", "plots/fid_vs_w.png"} <= arts, arts
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_neon_ray_run_end_to_end(tmp_path, undisturbed_tiny_run):
    # The first run is the session's undisturbed tiny run (the fault drills' settings: |S| = 60, 320 fine-tune
    # images, no floor), shared with test_faults; what this test adds (a rerun, a merge) leaves what they compare.
    out, first, sets = undisturbed_tiny_run
    same = [a for s in sets for a in ("--set", s)]  # the reruns: the same config
    minutes = first.seconds / 60
    summary = json.loads((out / "summary.json").read_text())
    for field in SUMMARY_FIELDS:
        assert field in summary, field
    assert summary["best_w"] in (0.5, 1.0) and summary["n_synthetic"] == 60 and summary["guidance"] == 2.0
    assert summary["fid_neon"] == min(t["fid"] for t in summary["trials"])
    assert 0 < summary["extra_compute_fraction"] < 1
    assert summary["best_model"] == f"tune/trials/w={summary['best_w']:.6g}/model.safetensors"  # relative to the output
    assert "FID" in first.log and "mlflow ui --backend-store-uri" in first.log
    assert (out / "samples_base_vs_neon.png").stat().st_size > 1000 and (out / "fid_vs_w.png").stat().st_size > 1000
    for stage in STAGES:
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert all(not v.startswith("/") for v in manifest["outputs"].values()), manifest["outputs"]
    assert (out / "finetune" / "ray").is_dir() and (out / "tune" / "ray").is_dir()  # Ray Train / Tune state on the output
    check_mlflow(out)

    # Quiet logs in a non-TTY: no progress bars, no per-dataset chatter, a bounded number of lines per minute.
    lines = first.log.splitlines()
    assert not [l for l in lines if re.search(r"\d+%\|", l) or "Running Dataset" in l or "Execution plan" in l], lines[:20]
    assert len(lines) <= 40 * minutes + 40, (len(lines), minutes)

    # The registered best model: Neon's w, sampler and FID as tags; loadable and sampling through MLflow.
    import mlflow
    import pandas as pd

    client, runs = mlflow_runs(out)
    name, version = summary["registered_model"]["model"], summary["registered_model"]["version"]
    tags = client.get_model_version(name, version).tags
    assert float(tags["w"]) == summary["best_w"] and float(tags["fid"]) == pytest.approx(summary["fid_neon"])
    assert json.loads(tags["sampler"])["guidance"] == 2.0
    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    images = model.predict(pd.DataFrame({"label": [0, 1, 2], "seed": [5, 6, 7]}))
    assert len(images) == 3 and images["png"][0][:4] == b"\x89PNG"
    count = len(runs)

    # `neon-ray review` reads it back: the winner linked to its trial run, the alias, a model that loads without neon-ray.
    reviewed = neon_ray_cli("review", str(out), "--json", timeout=300)
    assert reviewed.returncode == 0, reviewed.stderr[-3000:]
    record = json.loads(reviewed.stdout.strip().splitlines()[-1])
    winner = next(t for t in record["trials"] if t["winner"])
    assert winner["params"]["w"] == summary["best_w"] and all(t["run_id"] for t in record["trials"]) and not record["missing"]
    assert record["registered_model"]["alias"] == "champion" and record["registered_model"]["trial_run_id"] == winner["run_id"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(version)
    loaded = load_and_predict(record["registered_model"]["uri"], without_checkout({}, tmp_path / "home"), tmp_path / "empty")
    assert loaded["rows"] == 1 and loaded["head"] == b"\x89PNG".hex() and loaded["signature"]

    # Rerun: every stage skipped, nothing logged twice, the same parent resumed.
    t0 = time.time()
    second = neon_ray_cli("run", str(TINY), "--output", str(out), *same, timeout=600, env={"MLFLOW_TRACKING_URI": ""})
    wall = time.time() - t0
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((out / "summary.json").read_text())
    assert again["fid_neon"] == summary["fid_neon"] and again["best_w"] == summary["best_w"]
    assert all(s < 5 for s in again["stage_seconds"].values()), again["stage_seconds"]
    assert wall < 90, wall  # interpreter + imports + MLflow; no stage work
    assert second.stderr.count("up to date") >= 5
    assert len(mlflow_runs(out)[1]) == count
    check_mlflow(out)

    # A single-stage command logs into the same parent: `merge` at a chosen w.
    merged = neon_ray_cli("merge", str(TINY), "--output", str(out), *same, "--w", "0.25", env={"MLFLOW_TRACKING_URI": ""})
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert json.loads(merged.stdout.strip().splitlines()[-1])["stage"] == "merge"  # one single-line JSON object, last
    _, runs = mlflow_runs(out)
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    assert [r.data.tags.get("stage") for r in runs].count("merge") == 1 and (out / "merge" / "model.safetensors").exists()

    # A changed grid reruns the search, reusing the trials already scored: here only the w that lost, whose merged
    # model was deleted then, so it must be merged again (not re-scored) to become the best model.
    lost = next(t for t in summary["trials"] if t["w"] != summary["best_w"])
    result = out / "tune" / "trials" / f"w={lost['w']:.6g}" / "result.json"
    scored_at = result.stat().st_mtime_ns
    original = tree_digest(out)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, symlinks=True)

    # The copy reruns in place: it is complete as it is, and narrowing its grid touches only the copy.
    in_copy = neon_ray_cli("run", str(TINY), "--output", str(copy), *same, "--set", f"tune.w_grid=[{lost['w']}]",
                           timeout=600, env={"MLFLOW_TRACKING_URI": ""})
    assert in_copy.returncode == 0, in_copy.stderr[-3000:]
    assert in_copy.stderr.count("up to date") >= 4  # pretrain..evaluate reused from the copied manifests
    narrowed = json.loads((copy / "summary.json").read_text())
    assert narrowed["best_w"] == lost["w"] and narrowed["fid_neon"] == lost["fid"]
    assert [t["w"] for t in narrowed["trials"]] == [lost["w"]]
    assert (copy / "tune" / "trials" / f"w={lost['w']:.6g}" / "result.json").stat().st_mtime_ns == scored_at  # reused
    assert os.path.getsize(copy / narrowed["best_model"]) > 1000
    assert tree_digest(out) == original, "rerunning the copy changed the original output"
    assert (out / summary["best_model"]).exists()
