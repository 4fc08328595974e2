"""Streamed sample sets: the feature actors read a set's parts themselves; results equal the in-memory path's,
in the driver and inside a Tune trial; bad parts give one line and write nothing."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from _support import tiny_config

from neon_ray.data import CODECS, get_dataset
from neon_ray.errors import NeonError
from neon_ray.fid.extractors import (
    FMNIST_CLASSIFIER,
    PIXEL_POOL,
    feature_space,
    fingerprint,
)
from neon_ray.fid.prc import keep_mask, precision_recall
from neon_ray.fid.stats import frechet_distance
from neon_ray.runtime.features import extract
from neon_ray.runtime.samplesets import encoded_set, in_memory, open_samples
from neon_ray.runtime.sampling import write_part

PART_SIZES = (37, 64, 5, 100, 94)  # uneven: the feature shards cross part boundaries


@pytest.fixture(scope="module")
def real():
    x, y = get_dataset("fashion_mnist").load("test")
    return x[:300], y[:300], np.clip(x[300:600].astype(np.int16) + 40, 0, 255).astype(np.uint8), y[300:600]


def _write_set(dest: Path, images: np.ndarray, labels: np.ndarray, sizes=PART_SIZES, codec=None) -> Path:
    """A set of several parts through the product's writer, named so that name order is not index order."""
    codec = codec or get_dataset("fashion_mnist").codec
    start = 0
    for k, size in enumerate(sizes):
        idx = np.arange(start, start + size)
        write_part(str(dest / f"p{len(sizes) - k}.parquet"), codec, idx, labels[idx], idx, images[idx])
        start += size
    return dest


def _extract(cfg, samples, shards, keep=None, extractor=FMNIST_CLASSIFIER):
    return extract(samples, extractor, None, feature_space(extractor, None), fingerprint(extractor, None), cfg.evaluate, 64,
                   num_shards=shards, keep=keep)


@pytest.mark.parametrize("shards", [1, 3])
def test_streamed_parts_score_identically_to_the_in_memory_set(ray_local, tmp_path, real, shards):
    a, ya, b, yb = real
    cfg = tiny_config(tmp_path)
    streamed = open_samples(str(_write_set(tmp_path / "a", a, ya)))
    assert streamed.n == 300 and len(streamed.pieces) == len(PART_SIZES) and streamed.has_labels
    keep = keep_mask(300, 120, seed=5)
    memory = encoded_set(a, ya, get_dataset("fashion_mnist").codec, "a")  # the dataset-split path: one in-memory part
    ref = _extract(cfg, encoded_set(b, yb, get_dataset("fashion_mnist").codec, "b"), 1, keep=keep_mask(300, 150, seed=6))
    s, m = _extract(cfg, streamed, shards, keep), _extract(cfg, memory, shards, keep)
    # The same chunks in the same order: bit-identical float64 moments, hence identical FID and precision/recall.
    np.testing.assert_array_equal(s.stats.mu, m.stats.mu)
    np.testing.assert_array_equal(s.stats.sigma, m.stats.sigma)
    np.testing.assert_array_equal(s.features, m.features)
    assert s.consistency == m.consistency > 0.85
    fid = frechet_distance(s.stats, ref.stats)
    assert fid == frechet_distance(m.stats, ref.stats) and fid > 1.0
    assert precision_recall(s.features, ref.features, 5) == precision_recall(m.features, ref.features, 5)
    # Rows follow the parts' index order, not their file names: the kept features are those of a[keep].
    np.testing.assert_array_equal(in_memory(streamed).read_table().column("label").to_numpy(), ya)


def test_a_tune_trial_scores_the_streamed_set_as_the_driver_does(ray_local, tmp_path, real):
    """Inside a trial holding half a CPU, the actors read the parts (no Ray Data read task waits for a whole CPU)."""
    import sys

    from ray import cloudpickle, tune

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module by name
    a, ya, b, yb = real
    cfg = tiny_config(tmp_path)
    uri = str(_write_set(tmp_path / "a", a, ya))
    ref = _extract(cfg, encoded_set(b, yb, get_dataset("fashion_mnist").codec, "b"), 1).stats
    here = frechet_distance(_extract(cfg, open_samples(uri), 2).stats, ref)

    def trial(config):
        from neon_ray.config import RunConfig

        trial_cfg = RunConfig.model_validate(config["cfg"])
        tune.report({"fid": frechet_distance(_extract(trial_cfg, open_samples(uri), 2).stats, ref)})

    tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 0.5}), param_space={"cfg": cfg.for_workers()},
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="stream", verbose=0))
    results = tuner.fit()
    assert not results.errors, results.errors
    assert results[0].metrics["fid"] == here


def test_parts_disagreeing_in_column_or_shape_give_one_line_and_nothing_written(ray_local, tmp_path, real):
    from neon_ray.scoring import compute_reference, reference_uri

    a, ya, _, _ = real
    vec = _write_set(tmp_path / "vec", a, ya, sizes=(10, 10))
    write_part(str(vec / "p1.parquet"), CODECS["vector"], np.arange(10, 20), ya[10:20], np.arange(10, 20),
               np.zeros((10, 2), np.float32))
    with pytest.raises(NeonError, match=r"Parquet part .*p2\.parquet holds png \+ label but .*p1\.parquet holds vec \+ label") as err:
        open_samples(str(vec))
    assert "\n" not in str(err.value)

    big = np.zeros((10, 1, 32, 32), np.uint8)
    mixed = _write_set(tmp_path / "mixed", a, ya, sizes=(100, 50, 50))
    write_part(str(mixed / "p2.parquet"), get_dataset("fashion_mnist").codec, np.arange(100, 110), ya[:10], np.arange(10), big)
    cache = tmp_path / "cache"
    cfg = tiny_config(tmp_path / "o", f"evaluate.reference_source={mixed}", f"evaluate.reference_cache={cache}",
                      "evaluate.feature_batch_size=32")
    with pytest.raises(NeonError, match=r"mixed image shapes .*p2\.parquet row 0 is 1×32×32 but .*p3\.parquet row 0 is 1×28×28") as err:
        compute_reference(cfg, num_shards=2)
    assert "\n" not in str(err.value)
    assert not Path(reference_uri(cfg)).exists() and not any(cache.rglob("*.npz"))  # nothing written


def test_a_part_that_disappears_mid_pass_gives_one_line_and_a_rerun_resumes(ray_local, tmp_path, tiny_checkpoint):
    from neon_ray.runtime.run_model import spec_of
    from neon_ray.runtime.sampling import sample_to_parquet

    cfg = tiny_config(tmp_path / "out", f"model.checkpoint={tiny_checkpoint}", "generate.batch_size=5")
    sample = lambda: sample_to_parquet(spec_of(cfg), str(tiny_checkpoint), cfg.sampler, "image", 15, 7, "eval",
                                       str(tmp_path / "s"), cfg.generate, actors=2)
    uri = sample()["uri"]
    before = _extract(cfg, open_samples(uri), 2)
    opened = open_samples(uri)  # parts listed ...
    gone = Path(opened.pieces[1].part.parquet)
    gone.unlink()  # ... then one disappears before its actor reads it
    with pytest.raises(NeonError, match=rf"part disappeared during the pass: {gone}; nothing was written, rerun") as err:
        _extract(cfg, opened, 2)
    assert "\n" not in str(err.value)
    sample()  # the rerun resamples only the missing part
    after = _extract(cfg, open_samples(uri), 2)
    np.testing.assert_array_equal(after.stats.mu, before.stats.mu)
    np.testing.assert_array_equal(after.stats.sigma, before.stats.sigma)


def test_image_folder_skips_other_files_with_a_count_and_checks_every_image(ray_local, tmp_path, real, caplog):
    from PIL import Image

    a = real[0]
    root = tmp_path / "folder"
    for i in range(20):
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a[i, 0]).save(root / f"d{i % 3}" / f"{i:03d}.png")
    (root / "README.txt").write_text("not an image")
    (root / "labels.csv").write_text("0,1\n")
    with caplog.at_level(logging.WARNING, logger="neon_ray"):
        s = open_samples(str(root))
    assert s.n == 20 and s.shape == (1, 28, 28) and not s.has_labels
    assert any("skipped 2 file(s)" in r.getMessage() for r in caplog.records)
    cfg = tiny_config(tmp_path / "o")
    assert _extract(cfg, s, 1, extractor=PIXEL_POOL).stats.n == 20
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(root / "d2" / "zzz.png")  # the last file: RGB among grey
    with pytest.raises(NeonError, match=r"mixed image shapes .*d2/zzz\.png is 3×28×28 but .*d0/000\.png is 1×28×28"):
        _extract(cfg, open_samples(str(root)), 1, extractor=PIXEL_POOL)
    (root / "d2" / "zzz.png").write_bytes(b"not a png")
    with pytest.raises(NeonError, match=r"undecodable image .*d2/zzz\.png"):
        _extract(cfg, open_samples(str(root)), 1, extractor=PIXEL_POOL)
    shutil.rmtree(root)


@pytest.mark.slow  # two small runs of the benchmark, each starting its own Ray
def test_driver_memory_benchmark_rows_and_equal_fid_on_both_paths(tmp_path):
    import json
    import subprocess
    import sys

    from _support import ROOT, cli_env

    def run(*extra):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "driver_memory.py"), "--n", "200", "--steps", "2",
                               "--size", "32", "--part", "100", "--out", str(tmp_path), "--json", *extra],
                              capture_output=True, text=True, env=cli_env(), timeout=900, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    streamed, memory = run(), run("--in-memory")
    assert [r["n"] for r in streamed[:-1]] == [200, 400] and streamed[-1]["summary"]
    for row in streamed[:-1]:
        assert {"n", "image_bytes", "encoded_bytes", "driver_peak_rss_mb", "fid", "samples_per_s"} <= set(row)
        assert row["image_bytes"] == row["n"] * 3 * 32 * 32 and row["encoded_bytes"] > row["image_bytes"]  # noise: PNG cannot shrink it
    assert [r["fid"] for r in streamed[:-1]] == [r["fid"] for r in memory[:-1]]  # the same sets, the same chunks: equal FIDs
