"""Outputs on object storage: the tiny pipeline to s3:// on a real S3-protocol server (moto) with a real MLflow
server, no secret in any output, and one-line errors for storage that cannot take the run."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from _servers import BUCKET, READ_ONLY_PREFIX, free_port, planted_secret, start_mlflow
from _support import TINY, neon_ray_cli


def _one_line_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("neon-ray: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_storage_helpers_round_trip_on_s3(s3_server, monkeypatch):
    from neon_ray import storage

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    root = f"s3://{BUCKET}/unit"
    storage.ensure_writable(root)
    storage.write_json_atomic(storage.join(root, "a", "x.json"), {"v": 1})
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"v": 1}
    assert storage.relative(root, f"{root}/a/x.json") == "a/x.json" and storage.resolve(root, "a/x.json") == f"{root}/a/x.json"
    assert not [k for k in s3_server.filesystem().find(f"{BUCKET}/unit") if ".tmp-" in k or ".write-probe" in k]


@pytest.mark.parametrize("case", ["missing bucket", "wrong secret", "read-only prefix", "unreachable endpoint"])
def test_storage_that_cannot_take_the_run_is_one_line(s3_server, tmp_path, case):
    env = dict(s3_server.env)
    output = f"s3://{BUCKET}/runs/{case.replace(' ', '-')}"
    needle = {"missing bucket": "does not exist", "wrong secret": "credentials were rejected",
              "read-only prefix": "access denied", "unreachable endpoint": "cannot reach the storage endpoint"}[case]
    if case == "missing bucket":
        output = "s3://no-such-bucket-neon/run"
    elif case == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "read-only prefix":
        output = f"s3://{BUCKET}/{READ_ONLY_PREFIX}/run"
    else:
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    proc = neon_ray_cli("run", str(TINY), "--output", output, env=env | {"MLFLOW_TRACKING_URI": ""}, timeout=180)
    line = _one_line_error(proc, "output:", output, needle)
    assert env["AWS_SECRET_ACCESS_KEY"] not in line
    fs = s3_server.filesystem()
    if case == "missing bucket":
        assert not fs.exists("no-such-bucket-neon"), "the bucket must not be created"
    elif case != "unreachable endpoint":
        assert not fs.find(output.removeprefix("s3://")), "nothing may be written"


@pytest.mark.parametrize("output, needle", [("memory://neon/run", "exists only inside one process"), ("", "non-empty")])
def test_outputs_ray_workers_cannot_share_are_refused(tmp_path, output, needle):
    _one_line_error(neon_ray_cli("run", str(TINY), "--output", output), "output", needle)


@pytest.mark.slow
def test_tiny_pipeline_to_s3_with_an_mlflow_server_and_no_secret_in_any_output(s3_server, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    password = planted_secret()
    server = start_mlflow(tmp_path / "mlflow-server")
    try:
        tracking = server.url.replace("http://", f"http://neon:{password}@")
        env = {**s3_server.env, "MLFLOW_TRACKING_URI": tracking}
        output = f"s3://{BUCKET}/runs/tiny"
        local_state_before = set(os.listdir(tempfile.gettempdir()))
        first = neon_ray_cli("run", str(TINY), "--output", output, env=env, timeout=1500)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

        fs = s3_server.filesystem()
        root = f"{BUCKET}/runs/tiny"
        summary = json.loads(fs.cat_file(f"{root}/summary.json"))
        assert summary["best_w"] in (0.5, 1.0) and summary["best_model"].startswith("tune/trials/w=")
        keys = fs.find(root)
        for stage in ("pretrain", "generate", "finetune", "evaluate", "tune"):
            manifest = json.loads(fs.cat_file(f"{root}/{stage}/manifest.json"))
            assert all(not v.startswith(("s3://", "/")) for v in manifest["outputs"].values()), manifest["outputs"]
        # Ray Train's and Ray Tune's run state live under the output, not in the driver's temp dir.
        assert any(k.startswith(f"{root}/finetune/ray/") for k in keys) and any(k.startswith(f"{root}/pretrain/ray/") for k in keys)
        assert any(k.startswith(f"{root}/tune/ray/") and k.endswith("tuner.pkl") for k in keys)
        assert not {"neon-ray-train", "neon-ray-tune"} & (set(os.listdir(tempfile.gettempdir())) - local_state_before)
        assert not [k for k in keys if ".tmp-" in k]

        client = MlflowClient(tracking_uri=server.url)
        exp = client.get_experiment_by_name("neon-ray")
        runs = client.search_runs([exp.experiment_id])
        assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
        assert {r.data.tags.get("stage") for r in runs} >= {"pretrain", "generate", "finetune", "evaluate", "tune", "tune-trial"}
        version = client.get_model_version("neon-fashion_mnist-diffusion-unet-tiny", "1")
        assert float(version.tags["w"]) == summary["best_w"] and float(version.tags["fid"]) == pytest.approx(summary["fid_neon"])

        second = neon_ray_cli("run", str(TINY), "--output", output, env=env, timeout=600)
        assert second.returncode == 0 and second.stderr.count("up to date") >= 5, second.stderr[-3000:]
        runs = client.search_runs([exp.experiment_id])
        assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1  # the rerun resumed the parent
        assert len(runs) == 1 + 5 + 2  # and logged no stage twice

        # No secret anywhere: the S3 secret key and the tracking password, in any object, log line or MLflow record.
        secrets = (s3_server.secret_key, password)
        logs = first.stdout + first.stderr + second.stdout + second.stderr
        assert not [s for s in secrets if s in logs]
        leaks = [k for k in keys if any(s.encode() in fs.cat_file(k) for s in secrets)]
        leaks += [str(p) for p in Path(server.root).rglob("*") if p.is_file() and p.name != "server.log"
                  and any(s.encode() in p.read_bytes() for s in secrets)]
        assert not leaks, leaks
        del mlflow
    finally:
        server.stop()
