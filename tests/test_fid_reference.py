"""Reference statistics (ADM/EDM import, feature-space tags), precision/recall, sample-set errors, `neon-ray fid`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from neon_ray.data import get_dataset
from neon_ray.errors import NeonError
from neon_ray.fid.extractors import INCEPTION_SPACE
from neon_ray.fid.prc import keep_mask, knn_radii, precision_recall
from neon_ray.runtime.samplesets import open_samples
from neon_ray.fid.stats import Statistics, frechet_distance, import_published

from _support import TINY, neon_ray_cli, neon_ray_inprocess


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _gaussian(dim: int, seed: int, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4 * dim, dim)) + shift
    return x.mean(0), np.cov(x, rowvar=False)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("neon-ray: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------
# Published reference files


def test_adm_and_edm_npz_import_and_compare():
    mu, sigma = _gaussian(16, 0)
    mu2, sigma2 = _gaussian(16, 1, shift=0.5)
    adm = _npz(arr_0=np.zeros((3, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu[:4], sigma_s=sigma[:4, :4])
    edm = _npz(mu=mu2.astype(np.float32), sigma=sigma2.astype(np.float32))
    a = import_published(adm, "VIRTUAL_x.npz", INCEPTION_SPACE)
    b = import_published(edm, "cifar10-32x32.npz", INCEPTION_SPACE)
    np.testing.assert_array_equal(a.mu, mu)  # the pool statistics, not the spatial ones
    assert a.feature_space == b.feature_space == INCEPTION_SPACE and a.extractor == "imported"
    back = Statistics.from_bytes(a.to_bytes(), "tagged.npz")  # the tagged copy reads back as ours
    assert back.feature_space == INCEPTION_SPACE and back.source == "VIRTUAL_x.npz"
    assert frechet_distance(back, b) > 0.1 and abs(frechet_distance(back, a)) < 1e-9
    with pytest.raises(NeonError, match="is 2048-d"):
        import_published(edm, "cifar10-32x32.npz", INCEPTION_SPACE, dim=2048)
    with pytest.raises(NeonError, match="carries no feature-space tag.*ref-stats"):
        Statistics.from_bytes(edm, "cifar10-32x32.npz")  # untagged files must be imported, not guessed


@pytest.mark.parametrize("blob, needle", [
    (lambda good: good[: len(good) // 2], "corrupt or truncated statistics file"),
    (lambda good: b"not a zip at all", "corrupt or truncated statistics file"),
    (lambda good: _npz(mu=np.zeros(4)), "lacks sigma"),
    (lambda good: _npz(mu=np.zeros(4), sigma=np.eye(3)), "do not match"),
    (lambda good: _npz(mu=np.full(3, np.nan), sigma=np.eye(3)), "non-finite"),
])
def test_bad_statistics_files_give_one_line(blob, needle):
    mu, sigma = _gaussian(8, 0)
    data = blob(_npz(mu=mu, sigma=sigma))
    with pytest.raises(NeonError, match=needle) as err:
        import_published(data, "ref.npz", INCEPTION_SPACE)
    assert "\n" not in str(err.value) and "ref.npz" in str(err.value)


def test_statistics_from_other_feature_space_are_refused():
    mu, sigma = _gaussian(8, 0)
    inception = import_published(_npz(mu=mu, sigma=sigma), "adm.npz", INCEPTION_SPACE)
    classifier = Statistics(mu, sigma, 100, "fmnist-classifier@0123456789abcdef/feat128")
    with pytest.raises(NeonError) as err:
        frechet_distance(classifier, inception)
    assert str(err.value).count("\n") == 0
    assert INCEPTION_SPACE in str(err.value) and "fmnist-classifier@0123456789abcdef/feat128" in str(err.value)


# ----------------------------------------------------------------------------------------------
# Precision / recall


def test_precision_recall_self_and_far_away():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 32)).astype(np.float32)
    assert precision_recall(x, x, k=5) == {"precision": 1.0, "recall": 1.0}
    far = x + 100.0  # disjoint: no sample inside the other's k-NN balls
    assert precision_recall(far, x, k=5) == {"precision": 0.0, "recall": 0.0}
    # Mode dropping (2-D): generated samples cover only the x₀ > 0 half of the real set.
    real = rng.normal(size=(600, 2)).astype(np.float32)
    half = real[real[:, 0] > 0]
    pr = precision_recall(half, real, k=5)
    assert pr["precision"] == 1.0 and 0.4 < pr["recall"] < 0.75
    assert precision_recall(half, real, k=5, block=64) == pr  # distances in blocks of 64 rows: the same answer
    assert precision_recall(half, real, k=5, real_radii=knn_radii(real, 5)) == pr  # cached reference radii
    with pytest.raises(NeonError, match="evaluate.prc_k"):
        precision_recall(x[:5], x, k=5)


@pytest.mark.parametrize("k", [3, 5])
def test_precision_recall_matches_torch_fidelity(k):
    import torch
    from torch_fidelity.metric_prc import prc_features_to_metric

    rng = np.random.default_rng(k)
    real = rng.normal(size=(700, 16)).astype(np.float32)
    gen = (rng.normal(size=(500, 16)) * 0.9 + 0.5).astype(np.float32)  # narrower and shifted: neither metric is 0 or 1
    ours = precision_recall(gen, real, k=k, block=128)
    theirs = prc_features_to_metric(torch.from_numpy(gen), torch.from_numpy(real), prc_neighborhood=k, prc_batch_size=10000,
                                    save_cpu_ram=False, verbose=False)
    assert 0.05 < ours["precision"] < 0.95 and 0.05 < ours["recall"] < 0.95
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1 / 500)  # at most one boundary sample apart
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1 / 700)


def test_keep_mask_is_seeded_and_capped():
    m = keep_mask(1000, 100, seed=1)
    assert m.sum() == 100 and np.array_equal(m, keep_mask(1000, 100, seed=1))
    assert keep_mask(50, 100, seed=1).all()


# ----------------------------------------------------------------------------------------------
# Sample sets: bad inputs fail on the driver, with one line naming the file


def _folder(root: Path, images: dict[str, np.ndarray]) -> Path:
    for rel, arr in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(arr))
    return root


def test_image_folder_sorted_nested_and_errors(ray_local, tmp_path):
    from neon_ray.runtime.features import extract

    grey = np.zeros((28, 28), np.uint8)
    ok = _folder(tmp_path / "ok", {"b/2.png": grey, "a/1.png": grey + 1, "c.png": grey + 2})
    s = open_samples(str(ok))
    assert s.n == 3 and s.shape == (1, 28, 28) and not s.has_labels
    first = np.asarray(Image.open(io.BytesIO(s.read_table().column("png")[0].as_py())))
    assert first[0, 0] == 1  # sorted paths: a/1.png first

    # Opening reads one header; the feature pass's readers check every image (a pass of one shard runs here).
    mixed = _folder(tmp_path / "mixed", {"a.png": grey, "b.png": np.zeros((32, 32), np.uint8), "c.png": grey})
    with pytest.raises(NeonError, match=r"mixed image shapes .*b\.png is 1×32×32 but .*a\.png is 1×28×28"):
        extract(open_samples(str(mixed)), "pixel-pool", None, "pixel-pool@builtin/pool4", "pixel-pool@builtin",
                _tiny_evaluate(tmp_path), 8, num_shards=1)
    rgba = _folder(tmp_path / "rgba", {"a.png": np.zeros((28, 28, 4), np.uint8)})
    with pytest.raises(NeonError, match=r"a\.png has mode RGBA"):
        open_samples(str(rgba))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NeonError, match="empty sample set"):
        open_samples(str(tmp_path / "empty"))


def _tiny_evaluate(tmp_path):
    from _support import tiny_config

    return tiny_config(tmp_path / "o").evaluate


def test_extractor_input_checks():
    from neon_ray.fid.extractors import get_extractor

    get_extractor("fmnist-classifier").check_input((3, 28, 28), "x")  # RGB-stored grey is fine
    with pytest.raises(NeonError, match=r"evaluate.extractor: fmnist-classifier takes images of 28×28 .* holds 3×32×32"):
        get_extractor("fmnist-classifier").check_input((3, 32, 32), "cifar/")
    with pytest.raises(NeonError, match="inception-fid-helper .* holds 4×64×64"):
        get_extractor("inception-fid-helper").check_input((4, 64, 64), "x")
    get_extractor("inception-fid-helper").check_input((1, 8, 8), "digits")  # any size: resized to 299 inside
    with pytest.raises(NeonError, match="evaluate.extractor: unknown feature extractor 'nope'"):
        get_extractor("nope")


def _parquet_set(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """A sample set laid out as `generate` writes it: index, label, seed, png."""
    path.mkdir(parents=True)
    table = pa.table({"index": np.arange(len(images), dtype=np.int64), "label": labels.astype(np.int64),
                      "seed": np.arange(len(images), dtype=np.int64),
                      "png": pa.array([_png(im[0]) for im in images], pa.binary())})
    pq.write_table(table.slice(0, len(images) // 2), path / "part-0.parquet")
    pq.write_table(table.slice(len(images) // 2), path / "part-1.parquet")
    return path


def test_cli_bad_sample_sets_give_one_line(tmp_path):
    """Each fails before any reference is computed (a mixed folder in the readers of the set's own feature pass)."""
    mixed = _folder(tmp_path / "mixed", {"a.png": np.zeros((28, 28), np.uint8), "b/x.png": np.zeros((28, 28, 3), np.uint8)})
    rgb32 = _folder(tmp_path / "rgb32", {"a.png": np.zeros((32, 32, 3), np.uint8)})
    (tmp_path / "empty").mkdir()
    empty_parquet = tmp_path / "empty_pq"
    empty_parquet.mkdir()
    pq.write_table(pa.table({"index": pa.array([], pa.int64()), "png": pa.array([], pa.binary())}), empty_parquet / "p.parquet")
    cases = [
        ([str(mixed)], ["mixed image shapes", "x.png", "3×28×28"]),
        ([str(rgb32)], ["evaluate.extractor", "fmnist-classifier", "3×32×32"]),
        ([str(tmp_path / "empty")], ["empty sample set"]),
        ([str(empty_parquet)], ["empty sample set"]),
        ([str(tmp_path / "nowhere")], ["--samples", "nowhere"]),
    ]
    for args, needles in cases:
        proc = neon_ray_inprocess("fid", "--config", str(TINY), "--output", str(tmp_path / "o"), "--samples", *args)
        _one_line_error(proc, *needles)


def test_cli_import_errors(tmp_path):
    mu, sigma = _gaussian(8, 0)
    good = _npz(mu=mu, sigma=sigma)
    (tmp_path / "trunc.npz").write_bytes(good[: len(good) // 3])
    (tmp_path / "edm.npz").write_bytes(good)
    base = ["ref-stats", "--config", str(TINY), "--output", str(tmp_path / "o")]
    _one_line_error(neon_ray_inprocess(*base, "--import", str(tmp_path / "edm.npz")), "--import", INCEPTION_SPACE, "evaluate.extractor")
    helper = ["--set", "evaluate.extractor=inception-fid-helper"]
    _one_line_error(neon_ray_inprocess(*base, *helper, "--import", str(tmp_path / "trunc.npz")), "corrupt or truncated", "trunc.npz")
    _one_line_error(neon_ray_inprocess(*base, *helper, "--import", str(tmp_path / "edm.npz")), "edm.npz", "8-d", "2048-d")
    _one_line_error(neon_ray_inprocess(*base, "--set", "evaluate.extractor=inception-v3-compat", "--import", str(tmp_path / "edm.npz")),
                    "evaluate.extractor_weights", "inception-v3-compat")


def test_cli_imported_reference_is_used_and_other_spaces_refused(tmp_path):
    mu, sigma = _gaussian(2048, 0)
    (tmp_path / "adm.npz").write_bytes(_npz(mu=mu, sigma=sigma, mu_s=mu[:10], sigma_s=sigma[:10, :10]))
    out = tmp_path / "o"
    helper = ["--config", str(TINY), "--output", str(out), "--set", "evaluate.extractor=inception-fid-helper"]
    proc = neon_ray_cli("ref-stats", *helper, "--import", str(tmp_path / "adm.npz"), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["feature_space"] == INCEPTION_SPACE and result["dim"] == 2048 and result["features"] is None
    assert Statistics.from_bytes(Path(result["reference"]).read_bytes(), "x").feature_space == INCEPTION_SPACE
    # The same file named as the reference of a classifier config: refused, naming both spaces.
    samples = _folder(tmp_path / "s", {"a.png": np.zeros((28, 28), np.uint8), "b.png": np.ones((28, 28), np.uint8)})
    proc = neon_ray_cli("fid", "--config", str(TINY), "--output", str(out), "--set", f"evaluate.reference={result['reference']}",
                        "--samples", str(samples))
    _one_line_error(proc, "evaluate.reference", INCEPTION_SPACE, "fmnist-classifier@")


# ----------------------------------------------------------------------------------------------
# `neon-ray fid --json` end to end (real Ray, real torch-fidelity)


@pytest.fixture(scope="module")
def fid_sets(tmp_path_factory, reference_cache):
    root = tmp_path_factory.mktemp("fidsets")
    (root / "refcache").symlink_to(reference_cache)  # the session's: the 10k-image test-split reference is made once
    x, y = get_dataset("fashion_mnist").load("train")
    parquet = _parquet_set(root / "samples", x[:120], y[:120])
    folder = _folder(root / "folder", {f"img/{i:03d}.png": x[200 + i, 0] for i in range(60)})
    return root, parquet, folder


def _fid_json(root: Path, samples: Path, *extra: str) -> dict:
    proc = neon_ray_cli("fid", "--config", str(TINY), "--output", str(root / "out"), "--samples", str(samples), "--json",
                        "--set", "evaluate.prc_num_reference=2000", "--set", f"evaluate.reference_cache={root / 'refcache'}", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # exactly one JSON object on stdout


@pytest.mark.slow  # ~40 s when it computes the 10k-image reference of the test split first (the session's cache may hold it)
def test_cli_fid_json_on_parquet(fid_sets):
    root, parquet, _ = fid_sets
    r = _fid_json(root, parquet, "--num-shards", "3")
    assert r["n"] == 120 and r["fid"] > 0 and r["prc_k"] == 5
    assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["precision"] > 0.5  # real images lie on the real manifold
    assert r["fid_floor"] > 0 and abs(r["fid"] - r["fid_floor"]) / r["fid_floor"] < 0.5  # real train images vs test: ≈ the floor
    assert r["class_consistency"] > 0.85 and r["feature_space"].startswith("fmnist-classifier@")


def test_cli_fid_json_on_image_folder(fid_sets):
    root, _, folder = fid_sets
    f = _fid_json(root, folder, "--set", "evaluate.floor=false")
    assert f["n"] == 60 and f["fid"] > 0 and f["fid_floor"] is None and f["class_consistency"] is None
    assert {"fid", "precision", "recall", "n"} <= set(f)


def test_ref_stats_computes_once_then_is_up_to_date(fid_sets, tmp_path):
    root, parquet, _ = fid_sets
    args = ["ref-stats", "--config", str(TINY), "--output", str(tmp_path / "o"), "--json",
            "--set", f"evaluate.reference_source={parquet}", "--set", f"evaluate.reference_cache={tmp_path / 'cache'}"]
    first = neon_ray_cli(*args, "--num-shards", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    r1 = json.loads(first.stdout)
    assert r1["state"] == "computed" and r1["n"] == 120 and r1["source"] == str(parquet) and r1["features"]
    r2 = json.loads(neon_ray_cli(*args).stdout)
    assert r2["state"] == "up to date" and r2["reference"] == r1["reference"]
