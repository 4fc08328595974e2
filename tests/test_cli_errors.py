"""Bad input → one line naming the field or file, a non-zero exit, and no stage marked complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from _support import TINY, neon_ray_cli


def _assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("neon-ray: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def _no_manifests(out: Path) -> None:
    assert not list(out.rglob("manifest.json")) if out.exists() else True


@pytest.mark.parametrize("args, needles", [
    (["--set", "model.family=nope"], ["model.family", "nope"]),
    (["--set", "data.name=imagenet9"], ["data.name", "imagenet9"]),
    (["--set", "finetune.lr=-1"], ["finetune.lr"]),
    (["--set", "sampler.steps=0"], ["sampler.steps"]),
])
def test_config_errors(tmp_path, args, needles):
    proc = neon_ray_cli("run", str(TINY), "--output", str(tmp_path / "o"), *args)
    _assert_one_line_error(proc, *needles)
    _no_manifests(tmp_path / "o")


def test_missing_data_path(tmp_path):
    proc = neon_ray_cli("pretrain", str(TINY), "--output", str(tmp_path / "o"), "--set", f"data.path={tmp_path}/nowhere")
    _assert_one_line_error(proc, "data.path", "nowhere")
    _no_manifests(tmp_path / "o")


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00\x01not a checkpoint")
    proc = neon_ray_cli("generate", str(TINY), "--output", str(tmp_path / "o"), "--set", f"model.checkpoint={bad}")
    _assert_one_line_error(proc, "unreadable checkpoint", str(bad))
    _no_manifests(tmp_path / "o")


def test_missing_checkpoint(tmp_path):
    proc = neon_ray_cli("generate", str(TINY), "--output", str(tmp_path / "o"), "--set", f"model.checkpoint={tmp_path}/none.safetensors")
    _assert_one_line_error(proc, "model.checkpoint", "none.safetensors")


def test_mismatched_checkpoint(tmp_path, tiny_checkpoint):
    # a unet-tiny file given to a unet-small config
    proc = neon_ray_cli("generate", str(TINY), "--output", str(tmp_path / "o"), "--set", f"model.checkpoint={tiny_checkpoint}",
                        "--set", "model.preset=unet-small")
    _assert_one_line_error(proc, "does not fit the model", str(tiny_checkpoint), "missing keys")
    _no_manifests(tmp_path / "o")


@pytest.mark.parametrize("w", ["0", "-1", "nan", "inf"])
def test_merge_refuses_bad_w(tmp_path, tiny_checkpoint, w):
    proc = neon_ray_cli("merge", str(TINY), "--output", str(tmp_path / "o"), "--base", str(tiny_checkpoint),
                        "--finetuned", str(tiny_checkpoint), f"--w={w}")
    _assert_one_line_error(proc, "merge.w")
    _no_manifests(tmp_path / "o")


def test_merge_mismatched_pair(tmp_path, tiny_checkpoint):
    import torch
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"just.one": torch.zeros(3)}, str(other))
    proc = neon_ray_cli("merge", str(TINY), "--output", str(tmp_path / "o"), "--base", str(tiny_checkpoint), "--finetuned", str(other), "--w=1")
    _assert_one_line_error(proc, "do not match", "missing in")
    _no_manifests(tmp_path / "o")


def test_unwritable_output(tmp_path):
    proc = neon_ray_cli("run", str(TINY), "--output", "/proc/neon-ray-cannot-write")
    _assert_one_line_error(proc, "output", "/proc/neon-ray-cannot-write")


def test_stage_needs_its_inputs(tmp_path, tiny_checkpoint):
    proc = neon_ray_cli("finetune", str(TINY), "--output", str(tmp_path / "o"), "--set", f"model.checkpoint={tiny_checkpoint}")
    _assert_one_line_error(proc, "generate", "has not run")
