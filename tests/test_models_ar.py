"""Autoregressive family: tokenizer round trip, causality, KV cache, per-sample seeding, sampler validation."""

from __future__ import annotations

import pytest
import torch

from neon_ray.errors import ConfigError
from neon_ray.models import ModelSpec, get_family
from neon_ray.models.autoregressive import dequantize, filter_logits, inverse_cdf, quantize
from neon_ray.data.codec import CODECS
from neon_ray.runtime.seeds import balanced_labels, sample_seeds

SHAPE = (1, 6, 5)  # 30 tokens: small enough to sample in milliseconds


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def family():
    return get_family("autoregressive")(ModelSpec("autoregressive", "ar-tiny", SHAPE, 10))


@pytest.fixture(scope="module")
def net(family):
    torch.manual_seed(0)
    net = family.build().eval()
    with torch.no_grad():  # larger logits than at init, so that samples depend on the class and the past
        for p in net.parameters():
            p.mul_(8.0)
    return net


def test_levels_survive_the_png_round_trip():
    levels = 16
    tokens = torch.arange(levels).repeat(2)[None]  # (1, 32)
    images = dequantize(tokens, levels, (2, 4, 4))
    assert images.min() == -1 and images.max() == 1
    codec = CODECS["image"]
    stored = codec.to_model(codec.from_model(images))  # what S holds after generate → Parquet → finetune
    assert torch.equal(quantize(stored, levels), tokens)


def test_raster_order_is_pixel_major_channel_minor():
    img = torch.tensor([[[[-1.0, 1.0]]], [[[1.0, -1.0]]]]).reshape(1, 2, 1, 2)  # (B, C, H, W): channel 0 = [-1, 1]
    assert quantize(img, 2).tolist() == [[0, 1, 1, 0]]


def test_logits_are_causal(family, net):
    tokens = torch.randint(0, 8, (2, family.seq_len))
    labels = torch.tensor([3, 10])
    logits = net(tokens[:, :-1], labels)
    assert logits.shape == (2, family.seq_len, 8)
    changed = tokens.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 8
    other = net(changed[:, :-1], labels)
    # Position n predicts token n from tokens < n: token 12 only reaches positions ≥ 13.
    torch.testing.assert_close(logits[:, :13], other[:, :13])
    assert not torch.allclose(logits[:, 13:], other[:, 13:])


@pytest.mark.parametrize("kv_heads", [1, 2])  # multi-query (the presets) and plain multi-head attention
def test_kv_cache_matches_full_sequence_logits(kv_heads):
    family = get_family("autoregressive")(ModelSpec("autoregressive", "ar-tiny", SHAPE, 10, {"kv_heads": kv_heads}))
    torch.manual_seed(1)
    net = family.build().eval()
    with torch.no_grad():  # logits of order 1 (at init they are ~0.1, too flat to show a wrong mask)
        for p in net.parameters():
            p.mul_(3.0)
    tokens = torch.randint(0, 8, (3, family.seq_len))
    labels = torch.tensor([0, 4, 10])
    full = net(tokens[:, :-1], labels)  # (B, N, V)
    cache = net.new_cache()
    steps = [net(tokens[:, :0], labels, cache)]  # class token only
    steps.append(net(tokens[:, :5], labels, cache))  # a chunk of 5 (masked within the chunk)
    for i in range(5, family.seq_len - 1):
        steps.append(net(tokens[:, i : i + 1], labels, cache))
    cached = torch.cat(steps, dim=1)
    assert cached.shape == full.shape and cache.length == family.seq_len
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-5)  # equal up to float32 rounding


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.7, "top_k": 4, "top_p": 0.8, "guidance": 2.5}, {"guidance": 0.0}])
def test_each_image_depends_only_on_its_seed(family, net, settings):
    s = family.sampler_schema.model_validate(settings)
    seeds = sample_seeds(0, "eval", range(5))
    labels = torch.from_numpy(balanced_labels(range(5), 10))
    together = family.sample(net, labels, seeds, s)
    alone = torch.cat([family.sample(net, labels[i : i + 1], seeds[i : i + 1], s) for i in range(5)])
    assert together.shape == (5, *SHAPE) and together.abs().max() <= 1
    torch.testing.assert_close(together, alone)
    assert set(quantize(together, 8).unique().tolist()) <= set(range(8))
    other = family.sample(net, labels, sample_seeds(1, "eval", range(5)), s)
    assert not torch.equal(together, other)


def test_guidance_changes_samples(family, net):
    seeds, labels = sample_seeds(0, "g", range(4)), torch.tensor([1, 2, 3, 4])
    plain = family.sample(net, labels, seeds, family.sampler_schema())
    guided = family.sample(net, labels, seeds, family.sampler_schema(guidance=3.0))
    assert not torch.equal(plain, guided)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).log_softmax(-1)
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[False, True, False, True]]
    probs = logits.softmax(-1)[0]  # ≈ [0.03, 0.64, 0.09, 0.24]
    kept = torch.isfinite(filter_logits(logits, 0, float(probs[1] + 0.01)))
    assert kept.tolist() == [[False, True, False, True]]  # the smallest set with mass ≥ p
    assert torch.isfinite(filter_logits(logits, 0, 0.01)).sum() == 1  # the top token always stays


def test_inverse_cdf_never_picks_a_zero_probability_level():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(5, 1)
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1 - 1e-16], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [1, 1, 3, 3, 3]


def test_training_loss_is_finite_and_differentiable(family):
    net = family.build()
    x = torch.rand(4, *SHAPE) * 2 - 1
    loss = family.training_loss(net, x, torch.arange(4), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(8.0)).item()) < 0.5  # ≈ ln V at init
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("bad, field", [({"top_p": 0.0}, "sampler.top_p"), ({"top_p": 1.5}, "sampler.top_p"),
                                         ({"temperature": 0}, "sampler.temperature"), ({"guidance": -1}, "sampler.guidance"),
                                         ({"top_k": -1}, "sampler.top_k"), ({"steps": 3}, "sampler.steps")])
def test_sampler_validation_names_the_field(family, bad, field):
    with pytest.raises(ConfigError) as err:
        family.validate_sampler(bad)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_presets_build_for_fashion_mnist():
    fam = get_family("autoregressive")(ModelSpec("autoregressive", "ar-fmnist", (1, 28, 28), 10))
    net = fam.build()
    assert fam.seq_len == 784 and net.pos_emb.shape[0] == 784
    for bad, field in (({"levels": 1}, "model.options.levels"), ({"kv_heads": 3}, "model.options.kv_heads"),
                       ({"heads": 3}, "model.options.heads")):
        with pytest.raises(ConfigError, match=field):
            get_family("autoregressive")(ModelSpec("autoregressive", "ar-tiny", SHAPE, 10, bad)).build()
