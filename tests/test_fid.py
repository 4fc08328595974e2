"""FID: exact moment merging, sharded statistics equal to torch-fidelity's single-process FID, the shipped classifier."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from neon_ray.data import get_dataset
from neon_ray.fid.extractors import DEFAULT_WEIGHTS, FMNIST_CLASSIFIER, fingerprint
from neon_ray.fid.stats import Moments, Statistics, frechet_distance, merge_all
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


def test_statistics_refuse_other_feature_spaces_and_corrupt_files():
    a = Statistics(np.zeros(3), np.eye(3), 10, "x@1/f")
    b = Statistics(np.zeros(3), np.eye(3), 10, "y@2/f")
    with pytest.raises(NeonError, match="different feature spaces cannot be compared: x@1/f vs y@2/f"):
        frechet_distance(a, b)
    blob = a.to_bytes()
    assert Statistics.from_bytes(blob, "a.npz").feature_space == "x@1/f"
    with pytest.raises(NeonError, match="corrupt or truncated statistics file t.npz"):
        Statistics.from_bytes(blob[: len(blob) // 2], "t.npz")


def test_moments_along_a_line_pass_through_both_ends_and_stay_positive_semi_definite():
    """The line searcher's model of θ_w: μ and Σ linear between two sets, Σ projected to PSD when extrapolated."""
    from neon_ray.fid.stats import along_line

    rng = np.random.default_rng(0)
    a = Statistics.from_moments(Moments.of(rng.normal(size=(500, 4))), "s")
    b = Statistics.from_moments(Moments.of(rng.normal(size=(500, 4)) * np.array([0.2, 1, 1, 3]) + 1.0), "s")
    for t, ends in ((0.0, a), (1.0, b)):
        np.testing.assert_allclose(along_line(a, b, t).mu, ends.mu)
        np.testing.assert_allclose(along_line(a, b, t).sigma, ends.sigma)
    half = along_line(a, b, 0.5)
    np.testing.assert_allclose(half.sigma, (a.sigma + b.sigma) / 2)
    far = along_line(a, b, 2.0)  # Σ_a + 2(Σ_b − Σ_a): the 0.2-scaled axis goes negative before the projection
    assert np.linalg.eigvalsh(a.sigma + 2 * (b.sigma - a.sigma)).min() < 0
    assert np.linalg.eigvalsh(far.sigma).min() >= -1e-12 and np.isfinite(frechet_distance(far, a))
    with pytest.raises(NeonError, match="different feature spaces"):
        along_line(a, Statistics(b.mu, b.sigma, 500, "other"), 0.5)


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


A_SHIFT = 40  # brighter images: a shifted distribution


@pytest.fixture(scope="module")
def two_sets():
    """300 real test images and 300 others brightened, with torch-fidelity's own single-process FID between them."""
    import torch_fidelity

    from neon_ray.fid.extractors import register_extractors

    x, y = get_dataset("fashion_mnist").load("test")
    a, ya = x[:300], y[:300]
    b, yb = np.clip(x[300:600].astype(np.int16) + A_SHIFT, 0, 255).astype(np.uint8), y[300:600]
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
    return (a, ya), (b, yb), ref["frechet_inception_distance"]


@pytest.mark.parametrize("shards", [1, 2, 7])
def test_sharded_fid_equals_torch_fidelity_single_process(ray_local, tmp_path, two_sets, shards):
    from neon_ray.runtime.features import extract
    from neon_ray.fid.extractors import feature_space
    from neon_ray.fid.prc import keep_mask
    from neon_ray.runtime.samplesets import encoded_set

    cfg = tiny_config(tmp_path)
    codec = get_dataset("fashion_mnist").codec
    space, fp = feature_space(FMNIST_CLASSIFIER, None), fingerprint(FMNIST_CLASSIFIER, None)
    (a, ya), (b, yb), fid_torch_fidelity = two_sets
    keep = keep_mask(len(a), 50, seed=3)
    threads = torch.get_num_threads()
    pa_ = extract(encoded_set(a, ya, codec, "a"), FMNIST_CLASSIFIER, None, space, fp, cfg.evaluate, 64, num_shards=shards, keep=keep)
    pb = extract(encoded_set(b, yb, codec, "b"), FMNIST_CLASSIFIER, None, space, fp, cfg.evaluate, 64, num_shards=shards)
    assert pa_.stats.n == 300 and pa_.consistency > 0.85  # the classifier agrees with real labels
    assert torch.get_num_threads() == threads  # one shard runs in this process, which keeps its thread setting
    assert frechet_distance(pa_.stats, pb.stats) == pytest.approx(fid_torch_fidelity, rel=1e-6)
    assert fid_torch_fidelity > 1.0 and abs(frechet_distance(pa_.stats, pa_.stats)) < 1e-6
    # The kept features (for precision/recall) are the chosen rows, in row order, whatever the sharding.
    from neon_ray.fid.extractors import create_extractor

    with torch.no_grad():
        direct = create_extractor(FMNIST_CLASSIFIER, None, ["feat128"])(torch.from_numpy(a[keep]))[0].numpy()
    np.testing.assert_allclose(pa_.features, direct, rtol=1e-5, atol=1e-5)


def test_feature_line_reads_the_search_at_the_n_every_trial_reached_and_keys_a_w_only_search_by_the_configured_gamma():
    """benchmarks/feature_line.py compares its prediction with the run's search: at one n for every w (the first rung
    under ASHA), and a search over w alone (its trials record no γ) under the configured γ."""
    import importlib.util

    from _support import ROOT

    spec = importlib.util.spec_from_file_location("feature_line", ROOT / "benchmarks" / "feature_line.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    joint = {"trials": [{"w": 0.0, "sampler": {"guidance": 3.0}, "fid_by_n": {"200": 50.0, "1000": 48.0}},
                        {"w": 0.5, "sampler": {"guidance": 3.0}, "fid_by_n": {"200": 30.0}},
                        {"w": 0.5, "sampler": {"guidance": 2.0}, "fid_by_n": {"200": 40.0, "1000": 39.0}}]}
    assert module.measured_curves(joint, 1.5) == (200, {3.0: {0.0: 50.0, 0.5: 30.0}, 2.0: {0.5: 40.0}})
    w_only = {"trials": [{"w": w, "sampler": {}, "fid_by_n": {"5000": f}} for w, f in ((0.5, 397.4), (1.0, 365.2))]}
    assert module.measured_curves(w_only, 1.5) == (5000, {1.5: {0.5: 397.4, 1.0: 365.2}})
