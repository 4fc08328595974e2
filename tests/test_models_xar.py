"""xAR family: the official checkpoint layout, numerics against the official code, noisy-context training, per-cluster sampling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _support import (assert_imports_no_distributed_stack, assert_tampering_is_one_line, check_official_layout, meta_build,
                      meta_state, randomised)
from neon_ray.errors import ConfigError, NeonError
from neon_ray.models import ModelSpec, get_family
from neon_ray.models.xar import XAR_PRESETS, cluster_order

torch.set_num_threads(1)  # tiny networks: one thread is fastest, and leaves the other core alone

# (width, encoder blocks, decoder blocks, heads, parameters) of OliverRensu/xAR models/xar.py xar_base/large/huge
# (encoder_embed_dim = decoder_embed_dim, mlp_ratio 4, defaults img_size 256, vae_stride 16, patch_size 1,
# vae_embed_dim 16, clusters 4). The counts are those of the official module built on the meta device.
OFFICIAL = {
    "xAR-B": (768, 8, 8, 12, 172_638_224),
    "xAR-L": (1024, 16, 16, 16, 608_397_968),
    "xAR-H": (1280, 20, 20, 16, 1_186_024_096),
}
PAPER_SIZES = {"xAR-B": 172e6, "xAR-L": 608e6, "xAR-H": 1.19e9}


def official_xar_layout(width: int, encoder_depth: int, decoder_depth: int, heads: int, token_dim: int = 16, tokens: int = 256,
                        num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """The key → shape listing of the official `xAR` state dict (buffers included), written out by hand.

    Blocks: weightless RMSNorms (no keys), timm Attention with qkv bias and an EVA-02 2-D RoPE holding
    `freqs` (head_dim/4) and per-token cos/sin tables, timm SwiGLU (fc1_g, fc1_x, fc2; hidden
    int(dim·4·2/3)), `ada_lin` = SiLU + Linear(dim, 6·dim). The model holds the 0/−inf `mask` buffer.
    """
    hs, hidden = width // heads, int(width * 4 * 2 / 3)
    keys: dict[str, tuple[int, ...]] = {
        "class_emb.weight": (num_classes + 1, width),
        "time_embed.mlp.0.weight": (width, 256), "time_embed.mlp.0.bias": (width,),
        "time_embed.mlp.2.weight": (width, width), "time_embed.mlp.2.bias": (width,),
        "z_proj.weight": (width, token_dim), "z_proj.bias": (width,),
        "z_proj_ln.weight": (width,),
        "encoder_pos_embed_learned": (1, tokens, width),
        "encoder_norm.weight": (width,),
        "decoder_embed.weight": (width, width), "decoder_embed.bias": (width,),
        "decoder_pos_embed_learned": (1, tokens, width),
        "decoder_norm.weight": (width,),
        "pred.weight": (token_dim, width), "pred.bias": (token_dim,),
        "mask": (1, 1, tokens, tokens),
    }
    for stack, depth in (("encoder_blocks", encoder_depth), ("decoder_blocks", decoder_depth)):
        for i in range(depth):
            b = f"{stack}.{i}."
            keys |= {
                b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
                b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
                b + "attn.rope.freqs": (hs // 4,), b + "attn.rope.freqs_cos": (tokens, hs), b + "attn.rope.freqs_sin": (tokens, hs),
                b + "mlp.fc1_g.weight": (hidden, width), b + "mlp.fc1_g.bias": (hidden,),
                b + "mlp.fc1_x.weight": (hidden, width), b + "mlp.fc1_x.bias": (hidden,),
                b + "mlp.fc2.weight": (width, hidden), b + "mlp.fc2.bias": (width,),
                b + "ada_lin.1.weight": (6 * width, width), b + "ada_lin.1.bias": (6 * width,),
            }
    return keys


PARAMETER_BUFFERS = ("mask", ".rope.freqs", ".rope.freqs_cos", ".rope.freqs_sin")


def official_family(preset: str, shape=(16, 16, 16), options: dict | None = None):
    return get_family("xar")(ModelSpec("xar", preset, shape, 1000, options or {}))


def tiny(options: dict | None = None, shape=(1, 28, 28)):
    return get_family("xar")(ModelSpec("xar", "xar-tiny", shape, 10, options or {}))


# -- the official layout -------------------------------------------------------------------------


def test_model_module_imports_no_distributed_stack():
    assert_imports_no_distributed_stack("neon_ray.models.xar")


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_official_state_dict_layout_and_parameter_count(preset):
    width, enc, dec, heads, n_params = OFFICIAL[preset]
    # Parameters vs buffers as released (the EMA checkpoints hold both; only parameters count).
    counted = check_official_layout(official_family(preset), official_xar_layout(width, enc, dec, heads), n_params,
                                    PARAMETER_BUFFERS, f"{preset}.pth")
    assert counted == pytest.approx(PAPER_SIZES[preset], rel=0.02)


def test_official_hidden_sizes_and_presets():
    assert [int(w * 4 * 2 / 3) for w in (768, 1024, 1280)] == [2048, 2730, 3413]
    for preset, (width, enc, dec, heads, _) in OFFICIAL.items():
        assert XAR_PRESETS[preset] == dict(width=width, encoder_depth=enc, decoder_depth=dec, heads=heads, patch=1, clusters=4)
    net = meta_build(official_family("xAR-L"))
    assert net.encoder_blocks[0].mlp.fc1_g.out_features == 2730 and net.cluster_len == 64 and net.clusters == 4


def test_tampered_state_dict_names_the_key_in_one_line():
    family = official_family("xAR-B")
    net = meta_build(family)
    layout = official_xar_layout(768, 8, 8, 12)
    cases = {
        "missing keys [encoder_blocks.3.ada_lin.1.bias]": lambda d: d.pop("encoder_blocks.3.ada_lin.1.bias"),
        "unexpected keys [decoder_blocks.0.attn.q_norm.weight]": lambda d: d.__setitem__("decoder_blocks.0.attn.q_norm.weight", (64,)),
        "wrong shapes [decoder_blocks.7.mlp.fc2.weight (768, 2047)≠(768, 2048)]": lambda d: d.__setitem__("decoder_blocks.7.mlp.fc2.weight", (768, 2047)),
        "missing keys [mask]": lambda d: d.pop("mask"),
    }
    assert_tampering_is_one_line(family, net, layout, cases, "xAR-B.pth")


def test_checkpoint_of_another_size_or_token_layout_says_which():
    net = meta_build(official_family("xAR-B"))
    with pytest.raises(NeonError, match=r"^model\.checkpoint: xAR-L\.pth is an xAR of width 1024 with 16 \+ 16 blocks \(preset xAR-L\); "
                                        r"model\.preset xAR-B has width 768 with 8 \+ 8 blocks$"):
        official_family("xAR-B").load_state_dict(net, meta_state(official_xar_layout(1024, 16, 16, 16)), "xAR-L.pth")
    # A 4-channel, stride-8 latent (an SD-VAE at 256 px) fed to the official KL-16 weights.
    family = official_family("xAR-B", shape=(4, 32, 32))
    with pytest.raises(NeonError, match=r"^model\.checkpoint: xAR-B\.pth takes 16-value tokens; this run makes 4-value tokens"):
        family.load_state_dict(meta_build(family), meta_state(official_xar_layout(768, 8, 8, 12)), "xAR-B.pth")
    family = official_family("xAR-B", shape=(16, 32, 32))  # 512 px through KL-16: 32×32 tokens
    with pytest.raises(NeonError, match=r"^model\.checkpoint: xAR-B\.pth has 256 tokens; this run makes a 32×32 token grid"):
        family.load_state_dict(meta_build(family), meta_state(official_xar_layout(768, 8, 8, 12)), "xAR-B.pth")


def test_buffers_hold_the_block_causal_mask_and_rope_tables():
    family = official_family("xAR-B", options=dict(width=64, encoder_depth=1, decoder_depth=1, heads=2))
    net = family.build()
    cluster = torch.arange(256) // 64
    assert torch.equal(net.mask[0, 0] == 0, cluster[None, :] <= cluster[:, None]) and net.mask.isinf().sum() == 256 * 256 - 10 * 64 * 64
    rope = net.encoder_blocks[0].attn.rope
    # Token 1 of cluster 1 is raster position (row 0, column 9): rows rotate the first half, columns the second.
    i = 64 + 1
    assert cluster_order((16, 16), 2)[i] == 9
    angles = torch.atan2(rope.freqs_sin[i], rope.freqs_cos[i])
    torch.testing.assert_close(angles[:16], torch.zeros(16))
    torch.testing.assert_close(angles[16::2], torch.remainder(9 * rope.freqs + math.pi, 2 * math.pi) - math.pi)


# Reference values from the official code (OliverRensu/xAR models/xar.py, sampler.py), run on CPU with
# xAR(encoder/decoder_embed_dim=64, depth 2 + 2, heads 2): every parameter, in sorted name order, set to
# 0.1·N(0, 1) from torch.Generator().manual_seed(0); the training forward (forward_mae_encoder/decoder
# with the mask), and sample_tokens' loop of euler_maruyama_sampler with per-sample noise from seeds 11, 12.
REF_FORWARD = ([-0.236643, -0.097814, -0.180608, -0.343766], [-0.128195, -0.002631, -0.136477, -0.115338], 0.103356)
REF_EM_SAMPLE = ([0.323170, -0.540348, 1.260484, 0.948765], [1.085480, -0.984662, -1.621898, 1.312256], 0.629180)


def official_numerics_family():
    family = official_family("xAR-B", options=dict(width=64, encoder_depth=2, decoder_depth=2, heads=2))
    net = family.build()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(net.named_parameters()):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return family, net.eval()


def test_forward_matches_the_official_code():
    _, net = official_numerics_family()
    x = torch.randn(2, 256, 16, generator=torch.Generator().manual_seed(1))
    t = torch.rand(2, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = net(x, t, torch.tensor([3, 1000]))
    torch.testing.assert_close(out[0, 0, :4], torch.tensor(REF_FORWARD[0]), atol=2e-5, rtol=0)
    torch.testing.assert_close(out[1, 255, :4], torch.tensor(REF_FORWARD[1]), atol=2e-5, rtol=0)
    assert out.abs().mean().item() == pytest.approx(REF_FORWARD[2], abs=1e-5)


def test_euler_maruyama_cfg_ramp_matches_the_official_sampler():
    family, net = official_numerics_family()
    s = family.validate_sampler({"name": "euler_maruyama", "steps": 4, "guidance": 2.5, "guidance_ramp": "linear"})
    tokens = family.sample_tokens(net, torch.tensor([5, 9]), [11, 12], s)
    torch.testing.assert_close(tokens[0, 0, :4], torch.tensor(REF_EM_SAMPLE[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(tokens[1, 200, :4], torch.tensor(REF_EM_SAMPLE[1]), atol=1e-4, rtol=0)
    assert tokens.abs().mean().item() == pytest.approx(REF_EM_SAMPLE[2], abs=1e-5)


# -- the tiny preset: objective, mask, sampling -------------------------------------------------------


def test_tiny_preset_size_and_token_round_trip():
    family = tiny()
    net = family.build()
    assert family.grid == (14, 14) and family.token_dim == 4 and family.cluster_len == 49
    assert sum(p.numel() for p in net.parameters()) < 1_000_000
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    tokens = family.tokenize(x)
    assert tokens.shape == (3, 196, 4) and torch.equal(family.untokenize(tokens), x)
    # Cluster 0 is the top-left 14×14 pixels, in raster order of its 7×7 patches.
    torch.testing.assert_close(tokens[:, :49], x[:, :, :14, :14].reshape(3, 1, 7, 2, 7, 2).permute(0, 2, 4, 1, 3, 5).reshape(3, 49, 4))


def test_loss_is_finite_and_decreases_on_a_fixed_batch():
    family = tiny()
    torch.manual_seed(0)
    net = family.build().train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(8, 1, 28, 28, generator=g) > 0.5).float() * 2 - 1
    labels = torch.arange(8)
    losses = []
    for _ in range(30):
        loss = family.training_loss(net, images, labels, torch.Generator().manual_seed(0))  # same t, noise, drops each step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def test_noisy_context_gives_each_cluster_its_own_time():
    """The loss feeds the network one t per cluster and the velocity target ε − x (official convention)."""
    family = tiny()
    seen = {}

    class Spy(nn.Module):
        def forward(self, x_t, t, y):
            seen.update(x_t=x_t, t=t, y=y)
            return torch.zeros_like(x_t)

    images = torch.rand(64, 1, 28, 28) * 2 - 1
    loss = family.training_loss(Spy(), images, torch.zeros(64, dtype=torch.long), torch.Generator().manual_seed(0))
    t = seen["t"]
    assert t.shape == (64, 4) and (t > 0).all() and (t < 1).all() and t.std(dim=1).mean() > 0.1  # clusters differ
    assert 0.5 * 64 < (seen["y"] == 0).sum() < 64 and ((seen["y"] == 0) | (seen["y"] == 10)).all()  # ~10% null labels
    assert loss.item() == pytest.approx((images**2).mean().item() + 1, abs=0.05)  # E‖ε − x‖² with a zero network


def test_block_causal_mask_hides_later_clusters():
    family = tiny()
    net = randomised(family)
    x, t, y = torch.randn(2, 196, 4), torch.rand(2, 4), torch.tensor([1, 10])
    with torch.no_grad():
        base = net(x, t, y)
        later = x.clone()
        later[:, 2 * 49 :] = torch.randn(2, 2 * 49, 4)  # new tokens in clusters 2 and 3
        t_later = t.clone()
        t_later[:, 3] = 0.9
        out = net(later, t_later, y)
    torch.testing.assert_close(out[:, : 2 * 49], base[:, : 2 * 49], atol=1e-6, rtol=0)
    assert (out[:, 2 * 49 :] - base[:, 2 * 49 :]).abs().max() > 1e-2


def test_cached_context_equals_the_full_forward():
    family = tiny()
    net = randomised(family)
    x, y = torch.randn(2, 196, 4), torch.tensor([4, 7])
    t = torch.tensor([[0.0, 0.0, 0.0, 0.6]] * 2)  # three clean context clusters, the fourth at t = 0.6
    with torch.no_grad():
        full = net(x, t, y)[:, 3 * 49 :]
        cache = net.new_cache()
        net(x[:, : 3 * 49], t[:, :3], y, cache, write=True)
        cached = net(x[:, 3 * 49 :], t[:, 3:], y, cache)
        again = net(x[:, 3 * 49 :], t[:, 3:], y, cache)  # reading does not grow the cache
    assert cache.length == 3 * 49
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, cached, atol=0, rtol=0)


@pytest.mark.parametrize("settings", [
    {"name": "euler", "steps": 3, "guidance": 2.0},
    {"name": "euler_maruyama", "steps": 3, "guidance": 3.0, "guidance_ramp": "constant"},
])
def test_sampling_shape_range_determinism_and_batch_independence(settings):
    family = tiny()
    net = randomised(family)
    s = family.validate_sampler(settings)
    labels, seeds = torch.tensor([2, 5, 9]), [31, 32, 33]
    together = family.sample(net, labels, seeds, s)
    assert together.shape == (3, 1, 28, 28) and together.dtype == torch.float32 and together.abs().max() <= 1
    assert torch.equal(together, family.sample(net, labels, seeds, s))  # same seeds, same images
    alone = torch.cat([family.sample(net, labels[i : i + 1], seeds[i : i + 1], s) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    mixed = family.sample(net, torch.tensor([0, 5, 1]), [7, 32, 8], s)  # sample 1 among other samples
    torch.testing.assert_close(mixed[1], together[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together, family.sample(net, labels, [1, 2, 3], s))


class RowCounter:
    """Wraps the network's forward to record the batch rows of each call."""

    def __init__(self, net: nn.Module):
        self.rows: list[int] = []
        self.net = net
        inner = net.forward

        def forward(x, t, y, cache=None, write=False):
            self.rows.append(x.shape[0])
            return inner(x, t, y, cache, write)

        net.forward = forward


def test_cfg_ramp_over_clusters():
    family = tiny()
    net = randomised(family, scale=0.2)
    labels, seeds = torch.tensor([3, 8]), [5, 6]

    def run(**settings):
        counter = RowCounter(net)
        out = family.sample(net, labels, seeds, family.validate_sampler({"name": "euler", "steps": 2, **settings}))
        del net.forward
        return out, counter.rows

    plain, rows = run(guidance=1.0, guidance_ramp="constant")
    assert rows == [2] * 2 + [2, 2, 2] * 3  # conditional only: a context pass, then 2 steps, per cluster
    ramp1, rows1 = run(guidance=1.0, guidance_ramp="linear")
    assert torch.equal(ramp1, plain) and rows1 == rows  # a ramp to γ = 1 is no guidance at all
    ramp, rows3 = run(guidance=3.0, guidance_ramp="linear")
    assert rows3 == [2, 2] + [4, 4, 4] * 3  # cluster 0 at γ = 1, then both halves in one forward
    constant, _ = run(guidance=3.0, guidance_ramp="constant")
    # Cluster 0 (top-left 14×14) is sampled at γ = 1 under the ramp, at γ = 3 without it.
    torch.testing.assert_close(ramp[..., :14, :14], plain[..., :14, :14], atol=1e-6, rtol=0)
    assert (constant[..., :14, :14] - plain[..., :14, :14]).abs().max() > 1e-3
    assert (ramp[..., 14:, 14:] - plain[..., 14:, 14:]).abs().max() > 1e-3
    assert family.cluster_guidance(2.5, "linear") == pytest.approx([1.0, 1.5, 2.0, 2.5])
    assert tiny({"clusters": 1}).cluster_guidance(2.5, "linear") == [2.5]


def test_sampling_under_bf16_autocast():
    family = tiny()
    net = randomised(family)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = family.sample(net, torch.tensor([0, 1]), [1, 2], family.validate_sampler({"steps": 2, "guidance": 2.0}))
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and out.shape == (2, 1, 28, 28)


def test_checkpoint_round_trip_and_neon_merge_keep_the_buffers(tmp_path):
    from neon_ray.merge import merge_files
    from neon_ray.models.checkpoint import load_checkpoint, save_checkpoint

    family = tiny()
    base = family.build()
    ft = randomised(family)
    save_checkpoint(str(tmp_path / "base.safetensors"), base.state_dict(), family.spec, train_images=100)
    save_checkpoint(str(tmp_path / "ft.safetensors"), ft.state_dict(), family.spec)
    merge_files(str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"), str(tmp_path / "neon.safetensors"), w=0.5)
    state, _ = load_checkpoint(str(tmp_path / "neon.safetensors"))
    neon = family.build()
    family.load_state_dict(neon, state, "neon.safetensors")
    assert torch.equal(neon.mask, base.mask)  # the −inf mask is copied, never extrapolated
    rope = "encoder_blocks.0.attn.rope.freqs_cos"
    assert torch.equal(state[rope], base.state_dict()[rope])
    w = "decoder_blocks.1.ada_lin.1.weight"
    torch.testing.assert_close(state[w], base.state_dict()[w] - 0.5 * (ft.state_dict()[w] - base.state_dict()[w]))


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("settings,field", [
    ({"steps": 0}, "sampler.steps"),
    ({"guidance": -1}, "sampler.guidance"),
    ({"guidance_ramp": "cosine"}, "sampler.guidance_ramp"),
    ({"name": "heun"}, "sampler.name"),
    ({"rtol": 1e-3}, "sampler.rtol"),  # extra fields are forbidden
])
def test_sampler_errors_name_the_field(settings, field):
    with pytest.raises(ConfigError) as err:
        get_family("xar").validate_sampler(settings)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)


def test_sampler_defaults_are_the_official_ones():
    s = get_family("xar").validate_sampler({})
    assert (s.name, s.steps, s.guidance, s.guidance_ramp) == ("euler_maruyama", 50, 1.0, "linear")


@pytest.mark.parametrize("options,shape,message", [
    ({"clusters": 3}, (1, 28, 28), r"^model\.options\.clusters: must be a square number"),
    ({"clusters": 16}, (1, 28, 28), r"^model\.options\.clusters: 16 clusters \(4×4 cells\) do not divide the 14×14 token grid"),
    ({"patch": 3}, (1, 28, 28), r"^model\.preset: patch 3 does not divide the 28×28"),
    ({"heads": 3}, (1, 28, 28), r"^model\.options\.heads: 3 heads must divide width 64"),
    ({"depth": 3}, (1, 28, 28), r"^model\.options\.depth: unknown option for xar preset 'xar-tiny'"),
])
def test_bad_options_name_the_field(options, shape, message):
    with pytest.raises(ConfigError, match=message):
        tiny(options, shape)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match=r"^model\.preset: unknown preset 'xAR-XL' for family 'xar'"):
        get_family("xar")(ModelSpec("xar", "xAR-XL", (16, 16, 16), 1000))


def test_gpu_throughput_benchmark_runs_on_cpu_at_tiny_sizes():
    """benchmarks/gpu_throughput.py --tiny: a sampling row per model and precision, and a feature row per extractor."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"
    out = subprocess.run([sys.executable, str(script), "--tiny", "--device", "cpu", "--batch", "2", "--steps", "1", "--repeats", "1",
                          "--feature-batch", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [(r[0], r[2]) for r in rows if "tiny" in r[0]] == [("dit-tiny", "fp32"), ("dit-tiny", "bf16"), ("xar-tiny", "fp32"), ("xar-tiny", "bf16"),
                                                          ("var-tiny", "fp32"), ("var-tiny", "bf16"), ("imm-tiny", "fp32"), ("imm-tiny", "bf16")]
    assert all(float(r[3]) > 0 for r in rows if "tiny" in r[0])
    assert {r[0] for r in rows if len(r) == 3 and r[0] != "FID features"} == {"inception-fid-helper", "fmnist-classifier"}


@pytest.mark.parametrize("family,preset,shape", [("xar", "xar-tiny", (1, 28, 28)), ("diffusion", "dit-tiny", (1, 28, 28))])
def test_activation_checkpointing_gives_the_same_gradients(family, preset, shape):
    fam = get_family(family)(ModelSpec(family, preset, shape, 10))
    torch.manual_seed(0)
    plain = fam.build().train()
    checkpointed = fam.build().train()
    checkpointed.load_state_dict(plain.state_dict())
    fam.enable_activation_checkpointing(checkpointed)
    images, labels = torch.rand(3, *shape) * 2 - 1, torch.tensor([0, 1, 2])
    grads = []
    for net in (plain, checkpointed):
        fam.training_loss(net, images, labels, torch.Generator().manual_seed(0)).backward()
        grads.append({k: p.grad for k, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)
    unet = get_family("diffusion")(ModelSpec("diffusion", "unet-tiny", shape, 10))
    with pytest.raises(ConfigError, match=r"^finetune\.activation_checkpointing: the diffusion network UNet \(unet-tiny\) has no block stack"):
        unet.enable_activation_checkpointing(unet.build())


def test_finetune_refuses_activation_checkpointing_on_a_unet_before_any_worker_starts():
    from neon_ray.runtime.deepspeed import network_facts

    assert network_facts(ModelSpec("xar", "xar-tiny", (1, 28, 28), 10), activation_checkpointing=True) > 0  # a block stack
    with pytest.raises(ConfigError, match=r"^finetune\.activation_checkpointing: the diffusion network UNet \(unet-tiny\)"):
        network_facts(ModelSpec("diffusion", "unet-tiny", (1, 28, 28), 10), activation_checkpointing=True)
