"""A model family the project has never seen, plugged in without forking: `module:attr` and entry points."""

from __future__ import annotations

import json
import os

import pytest

from _support import ROOT, TINY, neon_ray_cli

PLUGIN_DIR = ROOT / "tests" / "plugins"
PLUGIN = "neon_plugin_demo:TinyFlowFamily"


def _env(*paths) -> dict:
    return {"PYTHONPATH": os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def test_entry_point_group_registers_a_family(tmp_path):
    """A pip-installed package declares `[neon_ray.models]`; the config names the family plainly."""
    dist = tmp_path / "site" / "neon_plugin_demo-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: neon-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[neon_ray.models]\ntiny-flow-demo = {PLUGIN}\n")
    proc = neon_ray_cli("show-config", str(TINY), "--set", "model.family=tiny-flow-demo", "--set", "model.preset=tiny",
                        "--set", "sampler={steps: 7}", env=_env(tmp_path / "site", PLUGIN_DIR))
    assert proc.returncode == 0, proc.stderr
    assert "family: tiny-flow-demo" in proc.stdout and "steps: 7" in proc.stdout
    # The family's own sampler schema validates: a bad value names the field.
    bad = neon_ray_cli("show-config", str(TINY), "--set", "model.family=tiny-flow-demo", "--set", "model.preset=tiny",
                       "--set", "sampler={steps: 0}", env=_env(tmp_path / "site", PLUGIN_DIR))
    assert bad.returncode == 2 and "neon-ray: error: sampler.steps" in bad.stderr


def test_plugin_that_is_not_a_family_is_refused(tmp_path):
    proc = neon_ray_cli("show-config", str(TINY), "--set", "model.family=neon_plugin_demo:EulerSettings",
                        env=_env(PLUGIN_DIR))
    assert proc.returncode == 2 and "model.family" in proc.stderr and "not a ModelFamily" in proc.stderr
    proc = neon_ray_cli("show-config", str(TINY), "--set", "model.family=no_such_module:Family")
    assert proc.returncode == 2 and "model.family: cannot import model family plugin" in proc.stderr


@pytest.mark.slow
def test_out_of_tree_family_runs_the_whole_pipeline(tmp_path, reference_cache):
    out = tmp_path / "run"
    proc = neon_ray_cli("run", str(TINY), "--output", str(out), "--set", f"model.family={PLUGIN}", "--set", "model.preset=tiny",
                        "--set", "sampler={steps: 3, guidance: 2.0}", "--set", "mlflow.enabled=false",
                        "--set", f"evaluate.reference_cache={reference_cache}",
                        env=_env(PLUGIN_DIR), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == f"{PLUGIN}/tiny"
    assert {t["w"] for t in summary["trials"]} == {0.5, 1.0}
    assert summary["fid_neon"] == min(t["fid"] for t in summary["trials"])
    for stage in ("pretrain", "generate", "finetune", "evaluate", "tune"):
        assert (out / stage / "manifest.json").exists(), stage
