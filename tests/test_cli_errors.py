"""Bad input → one line naming the field or file, a non-zero exit, and no stage marked complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from _support import TINY, neon_ray_cli, neon_ray_inprocess


def _assert_one_line_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("neon-ray: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _no_manifests(out: Path) -> None:
    assert not list(out.rglob("manifest.json")) if out.exists() else True


@pytest.mark.parametrize("args, needles", [
    (["--set", "model.family=nope"], ["model.family", "nope"]),
    (["--set", "data.name=imagenet9"], ["data.name", "imagenet9"]),
    (["--set", "finetune.lr=-1"], ["finetune.lr"]),
    (["--set", "sampler.steps=0"], ["sampler.steps"]),
])
def test_config_errors(tmp_path, args, needles):
    proc = neon_ray_inprocess("run", str(TINY), "--output", str(tmp_path / "o"), *args)
    _assert_one_line_error(proc, *needles)
    _no_manifests(tmp_path / "o")


def test_missing_data_path(tmp_path):
    proc = neon_ray_inprocess("pretrain", str(TINY), "--output", str(tmp_path / "o"), "--set", f"data.path={tmp_path}/nowhere")
    _assert_one_line_error(proc, "data.path", "nowhere")
    _no_manifests(tmp_path / "o")


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00\x01not a checkpoint")
    proc = neon_ray_inprocess("generate", str(TINY), "--output", str(tmp_path / "o"), "--set", f"model.checkpoint={bad}")
    _assert_one_line_error(proc, "unreadable checkpoint", str(bad))
    _no_manifests(tmp_path / "o")


def test_missing_checkpoint(tmp_path):
    proc = neon_ray_inprocess("generate", str(TINY), "--output", str(tmp_path / "o"), "--set", f"model.checkpoint={tmp_path}/none.safetensors")
    _assert_one_line_error(proc, "model.checkpoint", "none.safetensors")


def test_mismatched_checkpoint(tmp_path, tiny_checkpoint):
    # a unet-tiny file given to a unet-small config
    proc = neon_ray_inprocess("generate", str(TINY), "--output", str(tmp_path / "o"), "--set", f"model.checkpoint={tiny_checkpoint}",
                        "--set", "model.preset=unet-small")
    _assert_one_line_error(proc, "does not fit the model", str(tiny_checkpoint), "missing keys")
    _no_manifests(tmp_path / "o")


@pytest.mark.parametrize("w", ["0", "-1", "nan", "inf"])
def test_merge_refuses_bad_w(tmp_path, tiny_checkpoint, w):
    proc = neon_ray_inprocess("merge", str(TINY), "--output", str(tmp_path / "o"), "--base", str(tiny_checkpoint),
                        "--finetuned", str(tiny_checkpoint), f"--w={w}")
    _assert_one_line_error(proc, "merge.w")
    _no_manifests(tmp_path / "o")


def test_merge_mismatched_pair(tmp_path, tiny_checkpoint):
    import torch
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"just.one": torch.zeros(3)}, str(other))
    proc = neon_ray_inprocess("merge", str(TINY), "--output", str(tmp_path / "o"), "--base", str(tiny_checkpoint), "--finetuned", str(other), "--w=1")
    _assert_one_line_error(proc, "do not match", "missing in")
    _no_manifests(tmp_path / "o")


def test_unwritable_output(tmp_path):
    proc = neon_ray_inprocess("run", str(TINY), "--output", "/proc/neon-ray-cannot-write")
    _assert_one_line_error(proc, "output", "/proc/neon-ray-cannot-write")


def test_stage_needs_its_inputs(tmp_path, tiny_checkpoint):
    proc = neon_ray_inprocess("finetune", str(TINY), "--output", str(tmp_path / "o"), "--set", f"model.checkpoint={tiny_checkpoint}")
    _assert_one_line_error(proc, "generate", "has not run")


def test_families_lists_every_builtin_and_plugins():
    proc = neon_ray_cli("families")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for needle in ("diffusion", "preset DiT-XL/2", "edm", "flow", "autoregressive", "sampler.top_p", "fewstep",
                   "sampler.steps: 1|2|4|8", "toy-ddpm", "toy-flow"):
        assert needle in proc.stdout, needle
    plugin = neon_ray_cli("families", "neon_plugin_demo:TinyFlowFamily",
                          env={"PYTHONPATH": str(Path(__file__).parent / "plugins")})
    assert plugin.returncode == 0 and "tiny-flow-demo" in plugin.stdout, plugin.stderr[-2000:]
    _assert_one_line_error(neon_ray_cli("families", "nope"), "family", "nope")


CONFIGS = Path(__file__).resolve().parents[1] / "neon_ray" / "configs"


@pytest.mark.parametrize("config, args, needles", [
    ("tiny_dit.yaml", ["--set", "model.preset=DiT-XXL/2"], ["model.preset", "DiT-XXL/2"]),
    ("tiny_dit.yaml", ["--set", "sampler.guidance=-1"], ["sampler.guidance"]),
    ("tiny_edm.yaml", ["--set", "sampler.steps=0"], ["sampler.steps"]),
    ("tiny_flow.yaml", ["--set", "sampler.name=rk9"], ["sampler.name"]),
    ("tiny_ar.yaml", ["--set", "sampler.top_p=0"], ["sampler.top_p"]),
    ("tiny_ar.yaml", ["--set", "sampler.top_p=1.5"], ["sampler.top_p"]),
    ("tiny_ar.yaml", ["--set", "sampler.top_k=-1"], ["sampler.top_k"]),
    ("tiny_fewstep.yaml", ["--set", "sampler.steps=3"], ["sampler.steps"]),
    ("tiny_fewstep.yaml", ["--set", "sampler.guidance=-0.5"], ["sampler.guidance"]),
    ("toy_gaussian.yaml", ["--set", "evaluate.sampler={score_scale: 0}"], ["evaluate.sampler.score_scale"]),
])
def test_family_config_errors(tmp_path, config, args, needles):
    proc = neon_ray_inprocess("run", str(CONFIGS / config), "--output", str(tmp_path / "o"), *args)
    _assert_one_line_error(proc, *needles)
    _no_manifests(tmp_path / "o")


@pytest.mark.parametrize("image_shape, needle", [((1, 32, 32), "(1, 32, 32)"), ((3, 28, 28), "(3, 28, 28)")])
def test_checkpoint_for_another_resolution_or_channel_count(tmp_path, image_shape, needle):
    """A DiT checkpoint made for 32×32 or RGB inputs, given to the 28×28 grey tiny_dit config."""
    import torch

    from neon_ray.models import ModelSpec, get_family
    from neon_ray.models.checkpoint import save_checkpoint

    family = get_family("diffusion")(ModelSpec("diffusion", "dit-tiny", image_shape, 10))
    torch.manual_seed(0)
    path = tmp_path / "other.safetensors"
    save_checkpoint(str(path), family.build().state_dict(), family.spec, train_images=1000)
    proc = neon_ray_inprocess("generate", str(CONFIGS / "tiny_dit.yaml"), "--output", str(tmp_path / "o"), "--set", f"model.checkpoint={path}")
    _assert_one_line_error(proc, "model.checkpoint", needle, "(1, 28, 28)")
    _no_manifests(tmp_path / "o")


@pytest.mark.parametrize("args, needles", [
    (["--set", "evaluate.extractor=inception-v9"], ["evaluate.extractor", "inception-v9", "known"]),
    (["--set", "finetune.batch_size=9"], ["finetune.batch_size", "not divisible by finetune.workers=2"]),
    (["--set", "tune.w_grid=[0.5, 1.0, 0.5]"], ["tune.w_grid[2]", "duplicate"]),
    (["--set", "tune.w_grid=[0.5, -1]"], ["tune.w_grid[1]", "w must be > 0"]),
    (["--set", "model.options={widht: 3}"], ["model.options.widht", "unknown option"]),
])
def test_config_errors_stop_before_anything_is_set_up(tmp_path, args, needles):
    """Checked once, at load: not after earlier stages ran, and before the output or MLflow is touched."""
    proc = neon_ray_inprocess("run", str(TINY), "--output", str(tmp_path / "o"), *args)
    _assert_one_line_error(proc, *needles)
    assert not (tmp_path / "o").exists()


def test_missing_reference_file_is_not_computed_into_place(tmp_path, tiny_checkpoint):
    ref = tmp_path / "published.npz"
    proc = neon_ray_inprocess("evaluate", str(TINY), "--output", str(tmp_path / "o"), "--set", f"model.checkpoint={tiny_checkpoint}",
                        "--set", f"evaluate.reference={ref}", "--set", "mlflow.enabled=false")
    _assert_one_line_error(proc, "evaluate.reference", "not found", str(ref), "ref-stats")
    assert not ref.exists()
    _no_manifests(tmp_path / "o")


class NotATensor:
    """Any class: torch.save pickles it, and a weights-only load must refuse it."""


def test_pickled_checkpoint_is_refused_with_how_to_convert(tmp_path):
    import torch

    bad = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2), "extra": NotATensor()}, bad)
    proc = neon_ray_inprocess("generate", str(TINY), "--output", str(tmp_path / "o"), "--set", f"model.checkpoint={bad}")
    line = _assert_one_line_error(proc, str(bad), "pickled", "never unpickles", "safetensors")
    assert "weights_only=False" not in line
    _no_manifests(tmp_path / "o")


def test_tracking_server_that_does_not_answer_stops_before_any_work(tmp_path):
    from _servers import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    proc = neon_ray_inprocess("run", str(TINY), "--output", str(tmp_path / "o"), env={"MLFLOW_TRACKING_URI": uri})
    _assert_one_line_error(proc, "MLFLOW_TRACKING_URI", uri, "mlflow.enabled=false")
    _no_manifests(tmp_path / "o")


@pytest.mark.parametrize("command", ["run", "finetune"])
def test_zero_stage_without_deepspeed_names_the_extra(tmp_path, monkeypatch, command):
    """`pip install neon-ray` without the deepspeed extra, then a run that fine-tunes: one line naming the extra, before
    any stage. DeepSpeed is made unimportable here the way Python documents it (a None entry in sys.modules)."""
    import sys

    monkeypatch.setitem(sys.modules, "deepspeed", None)
    proc = neon_ray_inprocess(command, "tiny", "--output", str(tmp_path / "o"), "--set", "finetune.zero_stage=3")
    _assert_one_line_error(proc, "finetune.zero_stage", "ZeRO stage 3", 'neon-ray[deepspeed]')
    assert not (tmp_path / "o").exists()  # stopped before the output check writes anything
