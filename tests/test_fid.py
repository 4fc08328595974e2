"""FID: exact moment merging, the torch-fidelity extractor on real Fashion-MNIST, the shipped classifier."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from neon_ray.data import get_dataset
from neon_ray.fid.extractors import DEFAULT_WEIGHTS, FMNIST_CLASSIFIER, fingerprint
from neon_ray.fid.stats import Moments, Statistics, frechet_distance, merge_all
from neon_ray.imageio import encode_png
from neon_ray.errors import NeonError

from _support import tiny_config


@pytest.mark.parametrize("shards", [1, 2, 7])
def test_moments_merge_exactly_with_large_offset(shards):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 16)) * rng.uniform(0.1, 3, 16) + 100.0  # +100 offset: raw sums would lose digits
    parts = [Moments.of(p) for p in np.array_split(x, shards)]
    merged = merge_all(parts)
    ref_mu, ref_sigma = x.mean(0), np.cov(x, rowvar=False)
    np.testing.assert_allclose(merged.mean, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, ref_sigma, rtol=1e-9, atol=1e-12)


def test_statistics_refuse_other_extractors_and_corrupt_files():
    a = Statistics(np.zeros(3), np.eye(3), 10, "x@1")
    b = Statistics(np.zeros(3), np.eye(3), 10, "y@2")
    with pytest.raises(NeonError, match="different feature extractors"):
        frechet_distance(a, b)
    blob = a.to_bytes()
    assert Statistics.from_bytes(blob, "a.npz").extractor == "x@1"
    with pytest.raises(NeonError, match="corrupt statistics file t.npz"):
        Statistics.from_bytes(blob[: len(blob) // 2], "t.npz")


def test_shipped_classifier_matches_its_record_and_accuracy():
    from safetensors.torch import load_file

    from neon_ray.fid.classifier import FashionClassifier, accuracy

    path = DEFAULT_WEIGHTS[FMNIST_CLASSIFIER]
    record = json.load(open(path.replace(".safetensors", ".json")))
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == record["sha256"]
    net = FashionClassifier()
    net.load_state_dict(load_file(path))
    x, y = get_dataset("fashion_mnist").load("test")
    acc = accuracy(net, x, y)
    assert acc >= 0.90 and abs(acc - record["test_accuracy"]) < 1e-3


def _stats_via_ray(cfg, images, labels):
    from neon_ray.fid.distributed import feature_statistics
    from neon_ray.stages.evaluate import blocks_of

    table = pa.table({"png": [encode_png(im) for im in images], "label": labels})
    return feature_statistics(blocks_of(table, 100), cfg.evaluate.extractor, None, fingerprint(FMNIST_CLASSIFIER, None),
                              cfg.generate, 100)


def test_distributed_fid_self_zero_shift_positive_and_matches_torch_fidelity(ray_local, tmp_path):
    import torch_fidelity

    from neon_ray.fid.extractors import register_extractors

    cfg = tiny_config(tmp_path)
    x, y = get_dataset("fashion_mnist").load("test")
    a, ya = x[:500], y[:500]
    b = np.clip(x[500:1000].astype(np.int16) + 40, 0, 255).astype(np.uint8)  # brighter: a shifted distribution
    sa, consistency = _stats_via_ray(cfg, a, ya)
    sb, _ = _stats_via_ray(cfg, b, y[500:1000])
    assert sa.n == 500 and consistency > 0.85  # the classifier agrees with real labels
    assert abs(frechet_distance(sa, sa)) < 1e-6
    fid_ab = frechet_distance(sa, sb)
    assert fid_ab > 1.0

    # The same number from torch-fidelity's own single-process pipeline with the same extractor.
    register_extractors()

    class Set(torch.utils.data.Dataset):
        def __init__(self, arr):
            self.arr = torch.from_numpy(arr)

        def __len__(self):
            return len(self.arr)

        def __getitem__(self, i):
            return self.arr[i]

    ref = torch_fidelity.calculate_metrics(input1=Set(a), input2=Set(b), fid=True, feature_extractor=FMNIST_CLASSIFIER,
                                           feature_layer_fid="feat128", cuda=False, batch_size=100, verbose=False,
                                           save_cpu_ram=True, cache=False)
    assert fid_ab == pytest.approx(ref["frechet_inception_distance"], rel=1e-6)
