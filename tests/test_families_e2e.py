"""Every built-in family through `neon-ray run` on its tiny config: pretrain → generate → DeepSpeed
fine-tune → evaluate → Tune over w, on real Ray/DeepSpeed/MLflow/torch-fidelity."""

from __future__ import annotations

import json

import pytest

from _support import ROOT, neon_ray_cli
from test_e2e import check_mlflow

CONFIGS = ROOT / "jobs" / "configs"
# (config, overrides): the paper's toy runs shrunk (its own config is sized for the real experiment).
FAMILIES = {
    "dit": ("tiny_dit.yaml", []),
    "edm": ("tiny_edm.yaml", []),
    "flow": ("tiny_flow.yaml", []),
    "autoregressive": ("tiny_ar.yaml", []),
    "fewstep": ("tiny_fewstep.yaml", []),
    "toy-ddpm": ("toy_gaussian.yaml", ["pretrain.steps=50", "data.options.n_test=5000", "evaluate.num_samples=2000",
                                       "generate.num_samples=200", "finetune.budget_images=400", "tune.w_grid=[-1, 1]"]),
    "toy-flow": ("toy_gaussian.yaml", ["model.family=toy-flow", "sampler={steps: 10, temperature: 0.9}", "evaluate.sampler={temperature: 1.0}",
                                       "pretrain.steps=50", "data.options.n_test=5000", "evaluate.num_samples=2000",
                                       "generate.num_samples=200", "finetune.budget_images=400", "tune.w_grid=[-1, 1]"]),
}


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory):
    """One reference-statistics cache for the module: the Fashion-MNIST test split is featurized once, not per family."""
    return tmp_path_factory.mktemp("reference")


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_runs_end_to_end(tmp_path, family, reference_cache):
    config, overrides = FAMILIES[family]
    out = tmp_path / "run"
    args = [x for o in [*overrides, f"evaluate.reference_cache={reference_cache}"] for x in ("--set", o)]
    proc = neon_ray_cli("run", str(CONFIGS / config), "--output", str(out), *args, timeout=1500, env={"MLFLOW_TRACKING_URI": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"].split("/")[0] == family.replace("dit", "diffusion")
    assert summary["fid_neon"] == min(t["fid"] for t in summary["trials"])
    assert all(t["fid"] >= 0 for t in summary["trials"]) and summary["fid_base"] >= 0
    for stage in ("pretrain", "generate", "finetune", "evaluate", "tune"):
        assert (out / stage / "manifest.json").exists(), stage
    check_mlflow(out)
