"""The MLflow record lives with the output: a tiny run to s3:// (a real S3-protocol server, no tracking server)
keeps its whole record there, `neon-ray review` reads it back from a fresh home folder, and the registered model
loads and predicts in a process that has neither the checkout nor neon-ray on its path."""

from __future__ import annotations

import json
import shutil

import pytest
from _servers import BUCKET
from _support import TINY, load_and_predict, neon_ray_cli, without_checkout


@pytest.mark.slow
def test_a_tiny_run_to_s3_keeps_its_whole_record_there(s3_server, tmp_path, reference_cache, tiny_checkpoint):
    from neon_ray.tracking import working_copy_dir

    # From a given base (test_storage_s3 runs the pretrain stage to S3): the record is what is tested here.
    output = f"s3://{BUCKET}/runs/record"
    env = {**s3_server.env, "MLFLOW_TRACKING_URI": ""}
    run = neon_ray_cli("run", str(TINY), "--output", output, "--set", f"evaluate.reference_cache={reference_cache}",
                       "--set", f"model.checkpoint={tiny_checkpoint}", env=env, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"neon-ray review {output} --ui" in run.stdout + run.stderr

    fs = s3_server.filesystem()
    keys = fs.find(f"{BUCKET}/runs/record")
    root = f"{BUCKET}/runs/record/"
    assert {f"{root}mlflow.db", f"{root}mlflow.json"} <= set(keys)
    assert f"{root}mlflow.lease" not in keys  # released on exit
    artifacts = [k for k in keys if k.startswith(f"{root}mlartifacts/")]
    assert any(k.endswith("/plots/fid_vs_w.png") for k in artifacts) and any(k.endswith("/MLmodel") for k in artifacts)
    assert any("/code/neon_ray/mlflow_model.py" in k or "/code/neon_ray/models/" in k for k in artifacts), artifacts[:20]

    # Nothing of the record only on the driver: its working copy goes, and a fresh home reads the run back.
    shutil.rmtree(working_copy_dir(output))
    fresh = without_checkout(s3_server.env, tmp_path / "reviewer-home")
    proc = neon_ray_cli("review", output, "--json", env=fresh, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = json.loads(fs.cat_file(f"{root}summary.json"))
    state = json.loads(fs.cat_file(f"{root}mlflow.json"))
    assert record["parent_run_id"] == state["parent_run_id"] and not record["missing"], record["missing"]
    assert set(record["stages"]) >= {"generate", "finetune", "evaluate", "tune"}
    trials = record["trials"]
    assert len(trials) == len(summary["trials"]) and all(t["run_id"] and t["status"] in ("completed", "stopped") for t in trials)
    winners = [t for t in trials if t["winner"]]
    assert len(winners) == 1 and winners[0]["params"]["w"] == summary["best_w"]
    assert all(t["rung"] == max(int(n) for n in t["fid"]) for t in trials)
    assert all(t["grid"] == f"s3://{root}mlartifacts/{t['grid'].split('/mlartifacts/')[1]}" and t["grid"].endswith("/samples.png")
               for t in trials), [t["grid"] for t in trials]
    assert fs.exists(trials[0]["grid"])
    assert record["headline"]["fid_neon"] == summary["fid_neon"]
    model = record["registered_model"]
    assert model["alias"] == "champion" and model["version"] == "1" and model["uri"].startswith(f"s3://{root}mlartifacts/")
    assert model["trial_run_id"] == winners[0]["run_id"]

    text = neon_ray_cli("review", output, env=fresh, timeout=300)
    assert text.returncode == 0 and "winner" in text.stdout and "champion" in text.stdout, text.stdout + text.stderr

    # The registered model: loads from the output's artifacts and predicts its own input example, without the checkout.
    loaded = load_and_predict(model["uri"], fresh, tmp_path / "empty")
    assert loaded == {"rows": 1, "column": "png", "head": b"\x89PNG".hex(), "inputs": ["label", "seed"], "signature": True}


def test_review_of_a_uri_without_a_run_is_one_line(s3_server, tmp_path):
    proc = neon_ray_cli("review", f"s3://{BUCKET}/nothing-here", env=s3_server.env, timeout=120)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("neon-ray: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "no neon-ray output" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
