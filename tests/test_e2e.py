"""`neon-ray run` end to end on the tiny config: summary, MLflow runs and images, skip on rerun, a changed w grid."""

from __future__ import annotations

import json
import os
import time

import pytest

from _support import TINY, neon_ray_cli

SUMMARY_FIELDS = ("fid_base", "fid_neon", "best_w", "guidance", "sampler", "base_class_consistency", "n_synthetic",
                  "finetune_images", "extra_compute_fraction", "stage_seconds", "trials")


def check_mlflow(output, expected_stages=("pretrain", "generate", "finetune", "evaluate", "tune")) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output}/mlflow.db")
    exp = client.get_experiment_by_name("neon-ray")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) >= 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = {r.data.tags.get("stage") for r in children}
    assert set(expected_stages) <= stages, stages
    trials = [r for r in runs if r.data.tags.get("stage") == "tune-trial"]
    assert len(trials) >= 2 and all("fid" in r.data.metrics for r in trials)
    assert "fid_base" in parent.data.metrics and "fid_neon" in parent.data.metrics
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/samples_base_vs_neon.png", "plots/fid_vs_w.png"} <= arts, arts
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    del mlflow


@pytest.mark.slow
def test_neon_ray_run_end_to_end_skip_on_rerun_and_changed_grid(tmp_path):
    out = tmp_path / "run"
    first = neon_ray_cli("run", str(TINY), "--output", str(out), timeout=1500, env={"MLFLOW_TRACKING_URI": ""})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for field in SUMMARY_FIELDS:
        assert field in summary, field
    assert summary["best_w"] in (0.5, 1.0) and summary["n_synthetic"] == 40 and summary["guidance"] == 2.0
    assert summary["fid_neon"] == min(t["fid"] for t in summary["trials"])
    assert 0 < summary["extra_compute_fraction"] < 1
    assert "FID" in first.stdout and "mlflow ui --backend-store-uri" in first.stdout
    assert (out / "samples_base_vs_neon.png").stat().st_size > 1000 and (out / "fid_vs_w.png").stat().st_size > 1000
    for stage in ("pretrain", "generate", "finetune", "evaluate", "tune"):
        assert (out / stage / "manifest.json").exists()
    check_mlflow(out)

    t0 = time.time()
    second = neon_ray_cli("run", str(TINY), "--output", str(out), timeout=600, env={"MLFLOW_TRACKING_URI": ""})
    wall = time.time() - t0
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((out / "summary.json").read_text())
    assert again["fid_neon"] == summary["fid_neon"] and again["best_w"] == summary["best_w"]
    assert all(s < 5 for s in again["stage_seconds"].values()), again["stage_seconds"]
    assert wall < 90, wall  # interpreter + imports + MLflow; no stage work
    assert second.stderr.count("up to date") >= 5

    # A changed grid reruns the search, reusing the trials already scored: here only the w that lost, whose merged
    # model was deleted then, so it must be merged again (not re-scored) to become the best model.
    lost = next(t for t in summary["trials"] if t["w"] != summary["best_w"])
    result = out / "tune" / "trials" / f"w={lost['w']:.6g}" / "result.json"
    scored_at = result.stat().st_mtime_ns
    third = neon_ray_cli("run", str(TINY), "--output", str(out), "--set", f"tune.w_grid=[{lost['w']}]",
                         timeout=600, env={"MLFLOW_TRACKING_URI": ""})
    assert third.returncode == 0, third.stderr[-3000:]
    narrowed = json.loads((out / "summary.json").read_text())
    assert narrowed["best_w"] == lost["w"] and narrowed["fid_neon"] == lost["fid"]
    assert [t["w"] for t in narrowed["trials"]] == [lost["w"]]
    assert result.stat().st_mtime_ns == scored_at
    best_model = json.loads((out / "tune" / "manifest.json").read_text())["outputs"]["best_model"]
    assert best_model.endswith(f"w={lost['w']:.6g}/model.safetensors") and os.path.getsize(best_model) > 1000
