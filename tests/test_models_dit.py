"""DiT backbone: official checkpoint layout, numerics against an independent functional forward, VP diffusion on DiT."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _support import assert_imports_no_distributed_stack
from neon_ray.errors import ConfigError, NeonError
from neon_ray.models import ModelSpec, get_family
from neon_ray.models.checkpoint import load_checkpoint
from neon_ray.models.diffusion import VPSchedule, cosine_alpha_bar, linear_alpha_bar, normal_kl, vlb_bits
from neon_ray.models.dit import sincos_pos_embed


def official_dit_layout(depth: int, width: int, patch: int, in_channels: int, num_classes: int, input_size: int, learn_sigma: bool) -> dict[str, tuple[int, ...]]:
    """The key → shape listing of facebookresearch/DiT's `DiT` state dict (timm PatchEmbed/Attention/Mlp), written out by hand."""
    out = 2 * in_channels if learn_sigma else in_channels
    tokens = (input_size // patch) ** 2
    keys: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, tokens, width),
        "x_embedder.proj.weight": (width, in_channels, patch, patch),
        "x_embedder.proj.bias": (width,),
        "t_embedder.mlp.0.weight": (width, 256),
        "t_embedder.mlp.0.bias": (width,),
        "t_embedder.mlp.2.weight": (width, width),
        "t_embedder.mlp.2.bias": (width,),
        "y_embedder.embedding_table.weight": (num_classes + 1, width),
        "final_layer.linear.weight": (patch * patch * out, width),
        "final_layer.linear.bias": (patch * patch * out,),
        "final_layer.adaLN_modulation.1.weight": (2 * width, width),
        "final_layer.adaLN_modulation.1.bias": (2 * width,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        keys |= {
            b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
            b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
            b + "mlp.fc1.weight": (4 * width, width), b + "mlp.fc1.bias": (4 * width,),
            b + "mlp.fc2.weight": (width, 4 * width), b + "mlp.fc2.bias": (width,),
            b + "adaLN_modulation.1.weight": (6 * width, width), b + "adaLN_modulation.1.bias": (6 * width,),
        }
    return keys


def test_new_model_modules_import_no_distributed_stack_nor_diffusers():
    assert_imports_no_distributed_stack("neon_ray.models.dit", "neon_ray.models.edm", "neon_ray.models.flow", "neon_ray.models.latent",
                                        "neon_ray.models.diffusion")


def xl2_family():
    return get_family("diffusion")(ModelSpec("diffusion", "DiT-XL/2", (4, 32, 32), 1000))


def test_official_dit_xl2_state_dict_loads_strictly():
    family = xl2_family()
    with torch.device("meta"):  # 675M parameters: shapes only
        net = family.build()
    layout = official_dit_layout(28, 1152, 2, 4, 1000, 32, learn_sigma=True)
    official = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    family.load_state_dict(net, official, "DiT-XL-2-256x256.pt")
    # 675,129,632 parameters as the official train.py reports (pos_embed included, a Parameter there).
    assert sum(t.numel() for t in net.state_dict().values()) == sum(math.prod(s) for s in layout.values()) == 675_129_632
    assert family.hparams["schedule"] == "linear" and family.learn_sigma


def test_tampered_official_state_dict_names_the_keys():
    family = xl2_family()
    with torch.device("meta"):
        net = family.build()
    layout = official_dit_layout(28, 1152, 2, 4, 1000, 32, learn_sigma=True)
    layout.pop("blocks.27.mlp.fc2.bias")
    layout["y_embedder.embedding_table.weight"] = (1000, 1152)  # no null row
    with pytest.raises(NeonError) as err:
        family.load_state_dict(net, {k: torch.empty(s, device="meta") for k, s in layout.items()}, "bad.pt")
    msg = str(err.value)
    assert "blocks.27.mlp.fc2.bias" in msg and "y_embedder.embedding_table.weight" in msg and "bad.pt" in msg and "\n" not in msg


def test_checkpoint_for_another_input_size_says_so():
    family = xl2_family()
    with torch.device("meta"):
        net = family.build()
    layout = official_dit_layout(28, 1152, 2, 4, 1000, 64, learn_sigma=True)  # a 512² checkpoint (64×64 latents)
    with pytest.raises(NeonError, match=r"model\.checkpoint: .*1024 patch tokens.*\(4, 32, 32\)"):
        family.load_state_dict(net, {k: torch.empty(s, device="meta") for k, s in layout.items()}, "DiT-XL-2-512x512.pt")


def test_official_training_checkpoint_with_args_loads_its_ema(tmp_path):
    family = get_family("diffusion")(ModelSpec("diffusion", "dit-tiny", (1, 28, 28), 10))
    net = family.build()
    ema = {k: v + 1 for k, v in net.state_dict().items()}
    path = tmp_path / "0001000.pt"
    torch.save({"model": net.state_dict(), "ema": ema, "opt": {}, "args": argparse.Namespace(model="DiT-XL/2", image_size=256)}, path)
    state, meta = load_checkpoint(str(path))
    assert meta == {} and torch.equal(state["pos_embed"], ema["pos_embed"])
    family.load_state_dict(net, state, str(path))


def numpy_pos_embed(width: int, grid: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed, re-derived in numpy (w first in the meshgrid)."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(width // 2, gw), one_d(width // 2, gh)], axis=1)


def test_pos_embed_matches_the_mae_formula():
    np.testing.assert_allclose(sincos_pos_embed(64, 7, 7).numpy(), numpy_pos_embed(64, 7), atol=1e-6)


def functional_dit(sd: dict[str, torch.Tensor], x, t, y, depth: int, heads: int, patch: int, out_ch: int) -> torch.Tensor:
    """An independent DiT forward straight from the paper's description and the official weight layout."""
    b, _, h, w = x.shape
    tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    tf = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    temb = F.linear(F.silu(F.linear(tf, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])), sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    d = tok.shape[-1]
    ln = lambda z: F.layer_norm(z, (d,), eps=1e-6)  # noqa: E731
    for i in range(depth):
        p = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"])
        s1, g1, a1, s2, g2, a2 = mod.chunk(6, 1)  # shift, scale, gate (attention), shift, scale, gate (MLP)
        z = ln(tok) * (1 + g1[:, None]) + s1[:, None]
        qkv = F.linear(z, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, -1, 3, heads, d // heads)
        q, k, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        tok = tok + a1[:, None] * F.linear(att.transpose(1, 2).reshape(b, -1, d), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        z = ln(tok) * (1 + g2[:, None]) + s2[:, None]
        hid = F.gelu(F.linear(z, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate="tanh")
        tok = tok + a2[:, None] * F.linear(hid, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, 1)
    out = F.linear(ln(tok) * (1 + scale[:, None]) + shift[:, None], sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    gh, gw = h // patch, w // patch
    out = out.reshape(b, gh, gw, patch, patch, out_ch).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, q)
    return out.reshape(b, out_ch, h, w)


def test_dit_forward_matches_an_independent_functional_forward():
    family = get_family("diffusion")(ModelSpec("diffusion", "dit-tiny", (3, 16, 16), 10, {"learn_sigma": True, "patch": 2}))
    torch.manual_seed(0)
    net = family.build().eval()
    with torch.no_grad():  # leave adaLN-Zero's zeros: every weight must matter
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0.0, 17.0, 999.0]), torch.tensor([1, 10, 4])
    ours = net(x, t, y)
    ref = functional_dit(dict(net.state_dict()), x, t, y, depth=2, heads=2, patch=2, out_ch=6)
    assert ours.shape == (3, 6, 16, 16)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_adaln_zero_init_outputs_zero_and_identity_blocks():
    net = get_family("diffusion")(ModelSpec("diffusion", "dit-tiny", (1, 28, 28), 10)).build()
    out = net(torch.randn(2, 1, 28, 28), torch.tensor([3, 500]), torch.tensor([0, 10]))
    assert out.shape == (2, 1, 28, 28) and out.abs().max() == 0
    assert all(b.adaLN_modulation[-1].weight.abs().max() == 0 for b in net.blocks)


# -- VP diffusion on DiT -------------------------------------------------------------------------


def randomised(family):
    torch.manual_seed(0)
    net = family.build().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("options,settings", [
    ({}, {"steps": 3, "guidance": 2.0}),
    ({"learn_sigma": True, "schedule": "linear"}, {"name": "ancestral", "steps": 4, "guidance": 1.5}),
    ({"learn_sigma": True}, {"name": "ddim", "steps": 3, "eta": 0.5}),
])
def test_dit_diffusion_sample_depends_only_on_seed(options, settings):
    family = get_family("diffusion")(ModelSpec("diffusion", "dit-tiny", (1, 28, 28), 10, options))
    net = randomised(family)
    s = family.sampler_schema.model_validate(settings)
    labels, seeds = torch.tensor([0, 3, 7]), [11, 12, 13]
    together = family.sample(net, labels, seeds, s)
    alone = torch.cat([family.sample(net, labels[i : i + 1], seeds[i : i + 1], s) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert together.shape == (3, 1, 28, 28) and together.abs().max() <= 1
    assert not torch.allclose(together, family.sample(net, labels, [21, 22, 23], s))


def test_learned_sigma_loss_trains_variance_through_vlb_only():
    family = get_family("diffusion")(ModelSpec("diffusion", "dit-tiny", (1, 28, 28), 10, {"learn_sigma": True}))
    net = randomised(family).train()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    loss = family.training_loss(net, x, torch.arange(4), torch.Generator().manual_seed(0))
    loss.backward()
    w = net.final_layer.linear.weight.grad  # rows laid out (p, q, c) with c innermost: c = 1 is the variance channel
    assert torch.isfinite(loss) and w[1::2].abs().sum() > 0 and w[0::2].abs().sum() > 0

    # With the true ε and v = −1 (Σ = σ̃²), the model's posterior equals the true one: KL = 0 for t > 0.
    sched = VPSchedule(linear_alpha_bar(1000))
    x0, eps = torch.rand(3, 1, 8, 8) * 2 - 1, torch.randn(3, 1, 8, 8)
    t = torch.tensor([1, 500, 999])
    ab = VPSchedule.at(sched.alpha_bar, t)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    assert vlb_bits(sched, x0, x_t, t, eps, -torch.ones_like(eps)).abs().max() < 1e-4
    # At small t (β₁ ≫ σ̃²₁) any other variance costs bits; at large t the two bounds coincide.
    assert vlb_bits(sched, x0, x_t, t, eps, torch.ones_like(eps))[0] > 0.1
    assert torch.isfinite(vlb_bits(sched, x0, x_t, torch.tensor([0, 0, 0]), eps, torch.zeros_like(eps))).all()  # decoder NLL at t = 0
    assert normal_kl(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1)).item() == 0


def test_schedules():
    assert linear_alpha_bar(1000)[-1].item() == pytest.approx(4.036e-5, rel=1e-3)  # DDPM's ᾱ_T
    assert cosine_alpha_bar(1000)[0].item() == pytest.approx(0.99996, abs=1e-5)
    respaced = VPSchedule(linear_alpha_bar(1000)).respaced([0, 499, 999])
    torch.testing.assert_close(respaced.alpha_bar, linear_alpha_bar(1000)[[0, 499, 999]])
    assert respaced.betas[1].item() == pytest.approx(1 - linear_alpha_bar(1000)[499].item() / linear_alpha_bar(1000)[0].item())


def test_config_errors_name_the_field():
    F_ = get_family("diffusion")
    with pytest.raises(ConfigError, match=r"^model\.preset: patch 8 does not divide the 28×28"):
        F_(ModelSpec("diffusion", "DiT-S/8", (1, 28, 28), 10))
    with pytest.raises(ConfigError, match=r"^model\.options\.depthh: unknown option"):
        F_(ModelSpec("diffusion", "dit-tiny", (1, 28, 28), 10, {"depthh": 3}))
    with pytest.raises(ConfigError, match=r"^model\.options\.depth: unknown option for diffusion preset 'unet-tiny'"):
        F_(ModelSpec("diffusion", "unet-tiny", (1, 28, 28), 10, {"depth": 3}))
    with pytest.raises(ConfigError, match=r"^model\.options\.schedule: unknown schedule 'quad'"):
        F_(ModelSpec("diffusion", "dit-tiny", (1, 28, 28), 10, {"schedule": "quad"}))
    with pytest.raises(ConfigError, match=r"^sampler\.steps: "):
        F_.validate_sampler({"steps": 0})
    with pytest.raises(ConfigError, match=r"^sampler\.guidance: "):
        F_.validate_sampler({"guidance": -1})
    assert F_.validate_sampler({"compile": True}).compile is True


def test_presets_cover_the_dit_table():
    presets = get_family("diffusion").presets
    for size, (depth, width, heads) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}.items():
        for p in (2, 4, 8):
            hp = presets[f"DiT-{size}/{p}"]
            assert (hp["depth"], hp["width"], hp["heads"], hp["patch"], hp["backbone"]) == (depth, width, heads, p, "dit")
    assert presets["unet-p2s"] == dict(backbone="unet", channels=(48, 96), blocks_per_level=1, attention_levels=(1,), dropout=0.0, patch=2, schedule="cosine")
