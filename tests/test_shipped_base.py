"""The quickstart's shipped base checkpoint: its recorded hash, and the quality bar Neon needs."""

from __future__ import annotations

import hashlib
import json

import pytest

from _support import ROOT, tiny_config

CKPT = ROOT / "neon_ray" / "configs" / "checkpoints" / "fmnist-unet-p2s.safetensors"
RECORD = ROOT / "neon_ray" / "configs" / "checkpoints" / "fmnist-unet-p2s.json"


def test_checkpoint_matches_its_record():
    record = json.loads(RECORD.read_text())
    assert hashlib.sha256(CKPT.read_bytes()).hexdigest() == record["sha256"]
    assert CKPT.stat().st_size <= 20 * 2**20
    for key in ("command", "seed", "hardware", "wall_seconds", "train_images", "config"):
        assert key in record, key


@pytest.mark.slow
def test_base_samples_are_recognisable_at_cfg_1(ray_local, tmp_path, reference_cache):
    """≥ 80% of the base's CFG-1 samples are classified as their conditioning class (500 samples)."""
    from neon_ray.scoring import reference_statistics, score_checkpoint

    cfg = tiny_config(tmp_path / "out", f"model.checkpoint={CKPT}", "model.preset=unet-p2s", "sampler.steps=10",
                      "sampler.guidance=1.0", "evaluate.num_samples=500", "evaluate.feature_batch_size=250",
                      "generate.batch_size=125", f"evaluate.reference_cache={reference_cache}")
    scores = score_checkpoint(cfg, str(CKPT), str(tmp_path / "eval"), reference_statistics(cfg))
    assert scores["n"] == 500
    assert scores["class_consistency"] >= 0.80, scores
