"""VAR family: the official checkpoint layouts (transformer and VQ-VAE), next-scale training, per-seed sampling with
the CFG ramp, tokenizer files, and one-line errors for checkpoints of another size."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from _support import (assert_imports_no_distributed_stack, assert_tampering_is_one_line, check_official_layout, meta_build,
                      meta_state, randomised)
from neon_ray.errors import ConfigError, NeonError
from neon_ray.models import ModelSpec, get_family
from neon_ray.models.var import PN_256, PN_512, PN_FMNIST, VAR_PRESETS, resolve_tokenizer_path, SHIPPED_TOKENIZER
from neon_ray.models.var_vqvae import TOKENIZERS, VQVAE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Parameters of FoundationVision/VAR `build_vae_var(depth=d, shared_aln=...)` (models/__init__.py) built on the meta
# device with the official code (its VAR and VQVAE modules; 2026-12-07): they equal our counts to the parameter.
OFFICIAL = {
    "VAR-d16": (16, False, PN_256, 310_283_520),
    "VAR-d20": (20, False, PN_256, 600_917_136),
    "VAR-d24": (24, False, PN_256, 1_033_399_360),
    "VAR-d30": (30, False, PN_256, 2_010_020_356),
    "VAR-d36-s512": (36, True, PN_512, 2_353_893_904),
}
PAPER_SIZES = {"VAR-d16": 310e6, "VAR-d20": 601e6, "VAR-d24": 1.03e9, "VAR-d30": 2.01e9, "VAR-d36-s512": 2.35e9}  # the issue / Neon paper
VQVAE_PARAMETERS = 108_948_355  # vae_ch160v4096z32, the official VQVAE's parameters (its one buffer excluded)
BUFFERS = ("lvl_1L", "attn_bias_for_masking", ".attn.zero_k_bias")


def official_var_layout(depth: int, shared_aln: bool, patch_nums: tuple[int, ...], num_classes: int = 1000,
                        vocab: int = 4096, code_dim: int = 32) -> dict[str, tuple[int, ...]]:
    """The key → shape listing of the official `VAR` state dict (buffers included), written out by hand.

    Width C = 64·d, d heads; attention with attn_l2_norm (per-head `scale_mul_1H11`), a bias-free `mat_qkv` with
    separate q/v biases and the zero key bias buffer; FFN hidden 4·C; AdaLN per block (`ada_lin`), or with shared
    AdaLN one `shared_ada_lin` and a per-block `ada_gss`; the level index and the 0/−inf mask as buffers.
    """
    c, tokens, scales = 64 * depth, sum(p * p for p in patch_nums), len(patch_nums)
    keys: dict[str, tuple[int, ...]] = {
        "word_embed.weight": (c, code_dim), "word_embed.bias": (c,),
        "class_emb.weight": (num_classes + 1, c),
        "pos_start": (1, patch_nums[0] ** 2, c), "pos_1LC": (1, tokens, c), "lvl_embed.weight": (scales, c),
        "lvl_1L": (1, tokens), "attn_bias_for_masking": (1, 1, tokens, tokens),
        "head_nm.ada_lin.1.weight": (2 * c, c), "head_nm.ada_lin.1.bias": (2 * c,),
        "head.weight": (vocab, c), "head.bias": (vocab,),
    }
    if shared_aln:
        keys |= {"shared_ada_lin.1.weight": (6 * c, c), "shared_ada_lin.1.bias": (6 * c,)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys |= {
            b + "attn.scale_mul_1H11": (1, depth, 1, 1), b + "attn.q_bias": (c,), b + "attn.v_bias": (c,),
            b + "attn.zero_k_bias": (c,), b + "attn.mat_qkv.weight": (3 * c, c),
            b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,),
            b + "ffn.fc1.weight": (4 * c, c), b + "ffn.fc1.bias": (4 * c,),
            b + "ffn.fc2.weight": (c, 4 * c), b + "ffn.fc2.bias": (c,),
        }
        keys |= {b + "ada_gss": (1, 1, 6, c)} if shared_aln else {b + "ada_lin.1.weight": (6 * c, c), b + "ada_lin.1.bias": (6 * c,)}
    return keys


def official_vqvae_layout(scales: int = 10) -> dict[str, tuple[int, ...]]:
    """The key → shape listing of the official `VQVAE(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4)`.

    LDM encoder/decoder at ch_mult (1, 1, 2, 2, 4), 2 res blocks per level (3 in the decoder), attention at the
    lowest resolution (one 1×1 `qkv` conv) and in the middle; 3×3 quant convs; 4 φ convs; the usage buffer.
    """
    keys: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        keys[name + ".weight"], keys[name + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(name: str, c: int) -> None:
        keys[name + ".weight"], keys[name + ".bias"] = (c,), (c,)

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(name + ".norm1", cin), conv(name + ".conv1", cin, cout, 3), norm(name + ".norm2", cout), conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cin, cout, 1)

    def attn(name: str, c: int) -> None:
        norm(name + ".norm", c), conv(name + ".qkv", c, 3 * c, 1), conv(name + ".proj_out", c, c, 1)

    widths = [160 * m for m in (1, 1, 2, 2, 4)]
    conv("encoder.conv_in", 3, 160, 3)
    c = 160
    for i, w in enumerate(widths):
        for j in range(2):
            resnet(f"encoder.down.{i}.block.{j}", c, w)
            c = w
            if i == 4:
                attn(f"encoder.down.{i}.attn.{j}", w)
        if i != 4:
            conv(f"encoder.down.{i}.downsample.conv", w, w, 3)
    for part in ("encoder", "decoder"):
        resnet(f"{part}.mid.block_1", 640, 640), attn(f"{part}.mid.attn_1", 640), resnet(f"{part}.mid.block_2", 640, 640)
    norm("encoder.norm_out", 640), conv("encoder.conv_out", 640, 32, 3)
    conv("decoder.conv_in", 32, 640, 3)
    for i in reversed(range(5)):
        for j in range(3):
            resnet(f"decoder.up.{i}.block.{j}", c, widths[i])
            c = widths[i]
            if i == 4:
                attn(f"decoder.up.{i}.attn.{j}", c)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", 160), conv("decoder.conv_out", 160, 3, 3)
    conv("quant_conv", 32, 32, 3), conv("post_quant_conv", 32, 32, 3)
    for k in range(4):
        conv(f"quantize.quant_resi.qresi_ls.{k}", 32, 32, 3)
    keys["quantize.embedding.weight"] = (4096, 32)
    keys["quantize.ema_vocab_hit_SV"] = (scales, 4096)
    return keys


def official_family(preset: str, options: dict | None = None):
    side = 512 if preset.endswith("s512") else 256
    return get_family("var")(ModelSpec("var", preset, (3, side, side), 1000, options or {}))


@pytest.fixture(scope="module")
def vq_file(tmp_path_factory) -> str:
    """A randomly initialised vq-fmnist tokenizer: the protocol tests do not depend on the shipped weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vq") / "vq.safetensors"
    save_file({k: v.contiguous() for k, v in VQVAE(TOKENIZERS["vq-fmnist"], PN_FMNIST).state_dict().items()}, str(path),
              metadata={"tokenizer": "vq-fmnist", "patch_nums": "1_2_3_4_5_7"})
    return str(path)


def tiny(vq_file: str, options: dict | None = None):
    return get_family("var")(ModelSpec("var", "var-tiny", (1, 28, 28), 10, {"vae": vq_file, **(options or {})}))


# -- the official layouts ----------------------------------------------------------------------------


def test_model_modules_import_no_distributed_stack():
    assert_imports_no_distributed_stack("neon_ray.models.var")


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_official_state_dict_layout_and_parameter_count(preset):
    depth, shared, patch_nums, n_params = OFFICIAL[preset]
    counted = check_official_layout(official_family(preset), official_var_layout(depth, shared, patch_nums), n_params, BUFFERS,
                                    f"{preset}.pth")
    assert counted == pytest.approx(PAPER_SIZES[preset], rel=0.005)
    assert VAR_PRESETS[preset]["width"] == 64 * depth and VAR_PRESETS[preset]["heads"] == depth


def test_official_vqvae_layout_loads_strictly():
    from neon_ray.models.var import check_tokenizer

    layout = official_vqvae_layout()
    with torch.device("meta"):
        vq = VQVAE(TOKENIZERS["vae_ch160v4096z32"], PN_256)
    mine = {k: tuple(v.shape) for k, v in vq.state_dict().items()}
    assert mine == layout
    assert sum(p.numel() for p in vq.parameters()) == VQVAE_PARAMETERS == sum(math.prod(s) for k, s in layout.items() if "ema_vocab" not in k)
    check_tokenizer(meta_state(layout), {}, "vae_ch160v4096z32.pth", "vae_ch160v4096z32", PN_256)
    check_tokenizer(meta_state(layout), {}, "vae_ch160v4096z32.pth", "vae_ch160v4096z32", PN_512)  # the d36 model's use


@pytest.mark.parametrize("tamper,expected", [
    (lambda d: d.__setitem__("quantize.embedding.weight", (8192, 32)), "is a VQ-VAE of 8192 codes × 32 dims; this preset reads vae_ch160v4096z32 (4096 codes × 32 dims)"),
    (lambda d: d.__setitem__("quantize.ema_vocab_hit_SV", (13, 4096)), "was made for 13 scales; this preset uses 10 (1_2_3_4_5_6_8_10_13_16)"),
    (lambda d: d.pop("decoder.up.4.attn.2.qkv.bias"), "is not a vae_ch160v4096z32 VQ-VAE (checkpoint vq.pth does not fit the model: missing keys [decoder.up.4.attn.2.qkv.bias])"),
    (lambda d: d.__setitem__("encoder.conv_in.weight", (160, 1, 3, 3)), "wrong shapes [encoder.conv_in.weight (160, 1, 3, 3)≠(160, 3, 3, 3)]"),
])
def test_another_vqvae_is_one_line(tamper, expected):
    from neon_ray.models.var import check_tokenizer

    layout = official_vqvae_layout()
    tamper(layout)
    with pytest.raises(ConfigError) as err:
        check_tokenizer(meta_state(layout), {}, "vq.pth", "vae_ch160v4096z32", PN_256)
    msg = str(err.value)
    assert msg.startswith("model.options.vae: vq.pth ") and expected in msg and "\n" not in msg, msg


def test_tampered_state_dict_names_the_key_in_one_line():
    family = official_family("VAR-d16")
    net = meta_build(family)
    cases = {
        "missing keys [blocks.3.ada_lin.1.bias]": lambda d: d.pop("blocks.3.ada_lin.1.bias"),
        "unexpected keys [blocks.0.attn.k_bias]": lambda d: d.__setitem__("blocks.0.attn.k_bias", (1024,)),
        "wrong shapes [head.weight (4095, 1024)≠(4096, 1024)]": lambda d: d.__setitem__("head.weight", (4095, 1024)),
        "missing keys [attn_bias_for_masking]": lambda d: d.pop("attn_bias_for_masking"),
        "missing keys [blocks.15.attn.zero_k_bias]": lambda d: d.pop("blocks.15.attn.zero_k_bias"),
    }
    assert_tampering_is_one_line(family, net, official_var_layout(16, False, PN_256), cases, "var_d16.pth")


def test_checkpoint_of_another_depth_or_resolution_names_the_preset():
    family = official_family("VAR-d16")
    net = meta_build(family)
    with pytest.raises(NeonError) as err:
        family.load_state_dict(net, meta_state(official_var_layout(20, False, PN_256)), "var_d20.pth")
    msg = str(err.value)
    assert msg.startswith("model.checkpoint: var_d20.pth is a VAR of depth 20, width 1280, 680 tokens (preset VAR-d20 fits it); "
                          "model.preset VAR-d16 is depth 16, width 1024, 680 tokens; unexpected keys [blocks.16."), msg
    assert "\n" not in msg and msg.count("blocks.") <= 4  # the first few keys only
    # The 512² model given to a 256² preset.
    with pytest.raises(NeonError) as err:
        family.load_state_dict(net, meta_state(official_var_layout(36, True, PN_512)), "var_d36.pth")
    msg = str(err.value)
    assert ("is a VAR of depth 36, width 2304, shared AdaLN, 2240 tokens (preset VAR-d36-s512 fits it)" in msg
            and "missing keys [blocks.0.ada_lin.1.bias, blocks.0.ada_lin.1.weight, blocks.1.ada_lin.1.bias, ...+" in msg
            and "unexpected keys [shared_ada_lin.1.bias, shared_ada_lin.1.weight, blocks.0.ada_gss" in msg and "\n" not in msg), msg


def test_official_presets_refuse_other_image_shapes_and_need_their_vqvae():
    with pytest.raises(ConfigError, match=r"^model\.preset: VAR-d36-s512 tokenizes 3×512×512 images .*the data is 3×256×256$"):
        get_family("var")(ModelSpec("var", "VAR-d36-s512", (3, 256, 256), 1000, {}))
    with pytest.raises(ConfigError, match=r"^model\.preset: VAR-d16 tokenizes 3×256×256 images"):
        get_family("var")(ModelSpec("var", "VAR-d16", (1, 28, 28), 10, {}))
    family = official_family("VAR-d16")
    with pytest.raises(ConfigError, match=r"^model\.options\.vae: VAR-d16 needs its VQ-VAE file \(vae_ch160v4096z32"):
        family.tokenizer(torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"^model\.options\.vae: not found: /nope/vae\.pth"):
        official_family("VAR-d16", {"vae": "/nope/vae.pth"})


# Reference values from the official code (FoundationVision/VAR models/vqvae.py, var.py), run on CPU with
# VQVAE(vocab_size=64, z_channels=8, ch=32, share_quant_resi=4, v_patch_nums=(1, 2, 3, 4)) and VAR(depth=2,
# embed_dim=64, num_heads=2, attn_l2_norm=True, cond_drop_rate=0, no drop path): every parameter of each, in sorted
# name order, set to 0.1·N(0, 1) from torch.Generator().manual_seed(0); images N(0, 1) from seed 1 clamped to
# [−1, 1] (2×3×64×64); img_to_idxBl, idxBl_to_var_input, the forward at labels (3, null), fhat_to_img.
REF_TOKENS = ([57, 39, 22, 52, 45, 7, 57, 57, 45, 57, 57, 31, 45, 45, 7, 56, 56, 6, 2, 17, 17, 16, 3, 5, 5, 16, 58, 4, 17, 33],
              [45, 57, 26, 22, 29, 39, 25, 7, 57, 54, 45, 2, 7, 57, 56, 56, 56, 26, 62, 54, 29, 12, 6, 3, 47, 26, 62, 14, 14, 50])
REF_TEACHER = ([0.060710, -0.030199, 0.185606, -0.045172], 0.090326)  # x_in[1, 5, :4], mean |x_in|
REF_LOGITS = ([-0.034330, 0.480019, -0.005829, -0.365000], [-0.322818, -0.328794, -1.660226, 0.128046], 0.633477)
REF_DECODED = ([0.222679, -0.055737, 0.157308], 0.133625)  # image 0 at (:, 10, 20), mean |image|
# autoregressive_infer_cfg(B=2, label_B=(3, 7), cfg=2.0, top_k=1): greedy, so no randomness; images mapped to [−1, 1]
REF_GREEDY = ([-0.049881, 0.062525, 0.134341], [0.194591, 0.034775, 0.229518], 0.134625)  # [0, :, 30, 40], [1, :, 5, 60], mean |·|


def official_numerics_models():
    from neon_ray.models.var import VAR
    from neon_ray.models.var_vqvae import VQConfig

    pn = (1, 2, 3, 4)
    vq = VQVAE(VQConfig(vocab=64, z=8, ch=32, ch_mult=(1, 1, 2, 2, 4), res_blocks=2, in_channels=3), pn)
    net = VAR(64, 8, 10, depth=2, width=64, heads=2, patch_nums=pn, shared_aln=False, drop_path=0.0).eval()
    for module in (vq, net):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, p in sorted(module.named_parameters()):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return vq.eval(), net


def test_tokenizer_and_forward_match_the_official_code():
    vq, net = official_numerics_models()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        idx = vq.encode_indices(images)
        x_in = vq.teacher_input(idx)
        logits = net(x_in, torch.tensor([3, 10]))
        f_hat = torch.zeros(2, 8, 4, 4)
        for k, r in enumerate(idx):
            f_hat, _ = vq.next_input(k, f_hat, r)
        decoded = vq.decode(f_hat)
    assert torch.cat(idx, 1).tolist() == list(map(list, REF_TOKENS))
    torch.testing.assert_close(x_in[1, 5, :4], torch.tensor(REF_TEACHER[0]), atol=1e-5, rtol=0)
    assert x_in.abs().mean().item() == pytest.approx(REF_TEACHER[1], abs=1e-5)
    torch.testing.assert_close(logits[0, 0, :4], torch.tensor(REF_LOGITS[0]), atol=2e-5, rtol=0)
    torch.testing.assert_close(logits[1, 29, :4], torch.tensor(REF_LOGITS[1]), atol=2e-5, rtol=0)
    assert logits.abs().mean().item() == pytest.approx(REF_LOGITS[2], abs=1e-5)
    torch.testing.assert_close(decoded[0, :, 10, 20], torch.tensor(REF_DECODED[0]), atol=2e-5, rtol=0)
    assert decoded.abs().mean().item() == pytest.approx(REF_DECODED[1], abs=1e-5)


def test_greedy_sampling_with_the_cfg_ramp_matches_the_official_sampler(monkeypatch):
    """top-k 1 makes both samplers deterministic: the KV cache, the ramped CFG on the logits, the next scale's input
    and the decode are then compared exactly with the official autoregressive_infer_cfg."""
    from neon_ray.models import var_vqvae

    vq, net = official_numerics_models()
    monkeypatch.setitem(var_vqvae.TOKENIZERS, "official-small", vq.cfg)
    family = get_family("var")(ModelSpec("var", "var-tiny", (3, 64, 64), 10, {
        "tokenizer": "official-small", "patch_nums": [1, 2, 3, 4], "depth": 2, "width": 64, "heads": 2, "vae": None}))
    family.use_tokenizer(vq)
    images = family.sample(net, torch.tensor([3, 7]), [0, 1], family.validate_sampler({"guidance": 2.0, "top_k": 1, "top_p": 1.0}))
    torch.testing.assert_close(images[0, :, 30, 40], torch.tensor(REF_GREEDY[0]), atol=2e-5, rtol=0)
    torch.testing.assert_close(images[1, :, 5, 60], torch.tensor(REF_GREEDY[1]), atol=2e-5, rtol=0)
    assert images.abs().mean().item() == pytest.approx(REF_GREEDY[2], abs=1e-5)


# -- the tiny preset: objective, mask, cache, sampling -------------------------------------------------


def test_loss_is_cross_entropy_of_the_pyramid_and_decreases(vq_file):
    family = tiny(vq_file)
    torch.manual_seed(0)
    net = family.build().train()
    assert net.seq_len == 104 and sum(p.numel() for p in net.parameters()) < 300_000
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.arange(8)
    first = family.training_loss(net, images, labels, torch.Generator().manual_seed(0))
    assert first.item() == pytest.approx(math.log(512), abs=0.1)  # near-uniform logits at initialisation
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = family.training_loss(net, images, labels, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.85 * losses[0], losses


def test_labels_are_dropped_at_the_official_rate(vq_file):
    family = tiny(vq_file)
    seen = {}

    class Spy(nn.Module):
        def forward(self, x_rest, y):
            seen.update(x_rest=x_rest, y=y)
            return torch.zeros(x_rest.shape[0], 104, 512, requires_grad=True)

    loss = family.training_loss(Spy(), torch.rand(300, 1, 28, 28) * 2 - 1, torch.zeros(300, dtype=torch.long), torch.Generator().manual_seed(0))
    assert seen["x_rest"].shape == (300, 103, 16) and loss.item() == pytest.approx(math.log(512))
    dropped = (seen["y"] == 10).float().mean().item()
    assert ((seen["y"] == 0) | (seen["y"] == 10)).all() and 0.05 < dropped < 0.15


def test_block_causal_mask_hides_later_scales_and_the_cache_equals_the_full_forward(vq_file):
    family = tiny(vq_file)
    net = randomised(family, scale=0.1)
    assert net.lvl_1L.dtype == torch.int64 and net.lvl_1L[0, -49:].eq(5).all()
    assert torch.isinf(net.attn_bias_for_masking).sum() == sum(p * p * sum(q * q for q in PN_FMNIST[k + 1:]) for k, p in enumerate(PN_FMNIST))
    x, y = torch.randn(2, 103, 16), torch.tensor([1, 10])
    with torch.no_grad():
        full = net(x, y)
        later = x.clone()
        later[:, 29:] = torch.randn(2, 74, 16)  # new inputs of scales 5 and 6 (positions 30 onwards)
        out = net(later, y)
        torch.testing.assert_close(out[:, :30], full[:, :30], atol=1e-6, rtol=0)
        assert (out[:, 30:] - full[:, 30:]).abs().max() > 1e-3
        cache, logits, start = net.new_cache(), [], 0
        for k, pn in enumerate(PN_FMNIST):  # map by map, as the sampler runs
            logits.append(net.next_scale(None if k == 0 else x[:, start - 1 : start - 1 + pn * pn], y, cache))
            start += pn * pn
    assert cache.length == 104
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=1e-5)


def test_sample_i_depends_only_on_seed_i(vq_file):
    family = tiny(vq_file)
    net = randomised(family, scale=0.1)
    s = family.validate_sampler({"guidance": 2.0, "top_k": 100, "top_p": 0.9})
    labels, seeds = torch.tensor([2, 5, 9, 0]), [31, 32, 33, 34]
    images = family.sample(net, labels, seeds, s)
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.float32 and images.abs().max() <= 1
    _, maps = family.sample_tokens(net, labels, seeds, s)
    for i in range(4):
        _, alone = family.sample_tokens(net, labels[i : i + 1], seeds[i : i + 1], s)
        assert all(torch.equal(a[0], m[i]) for a, m in zip(alone, maps))  # the same tokens in a batch of 1 as of 4
    torch.testing.assert_close(family.sample(net, labels[2:3], seeds[2:3], s)[0], images[2], atol=1e-5, rtol=0)
    assert torch.equal(images, family.sample(net, labels, seeds, s))
    assert not torch.equal(torch.cat(maps, 1), torch.cat(family.sample_tokens(net, labels, [1, 2, 3, 4], s)[1], 1))


def test_cfg_batches_both_halves_and_ramps_over_scales(vq_file):
    family = tiny(vq_file)
    net = randomised(family, scale=0.3)
    labels, seeds = torch.tensor([3, 8]), [5, 6]
    rows = []
    inner = net.next_scale

    def counting(x, y, cache):
        rows.append(y.tolist())
        return inner(x, y, cache)

    net.next_scale = counting
    plain = family.sample_tokens(net, labels, seeds, family.validate_sampler({"guidance": 0.0}))[1]
    assert rows == [[3, 8]] * 6  # conditional only
    rows.clear()
    guided = family.sample_tokens(net, labels, seeds, family.validate_sampler({"guidance": 4.0}))[1]
    assert rows == [[3, 8, 10, 10]] * 6  # labels and null labels in one forward at every scale
    assert family.scale_guidance(4.0) == pytest.approx([0.0, 0.8, 1.6, 2.4, 3.2, 4.0])
    assert torch.equal(guided[0], plain[0])  # t_1 = 0: the first map is conditional only
    assert not torch.equal(torch.cat(guided[1:], 1), torch.cat(plain[1:], 1))
    del net.next_scale


def test_sampling_under_bf16_autocast(vq_file):
    family = tiny(vq_file)
    net = randomised(family, scale=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = family.sample(net, torch.tensor([0, 1]), [1, 2], family.validate_sampler({"guidance": 1.0}))
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and out.shape == (2, 1, 28, 28)


def test_activation_checkpointing_gives_the_same_gradients(vq_file):
    family = tiny(vq_file)
    torch.manual_seed(0)
    plain = family.build().train()
    checkpointed = family.build().train()
    checkpointed.load_state_dict(plain.state_dict())
    family.enable_activation_checkpointing(checkpointed)
    images, labels = torch.rand(3, 1, 28, 28) * 2 - 1, torch.tensor([0, 1, 2])
    grads = []
    for net in (plain, checkpointed):
        family.training_loss(net, images, labels, torch.Generator().manual_seed(0)).backward()
        grads.append({k: p.grad for k, p in net.named_parameters()})
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-6, rtol=1e-5)


# -- the shipped tokenizer and configuration -------------------------------------------------------


def test_shipped_tokenizer_loads_strictly_and_reconstructs():
    from neon_ray.data import get_dataset

    path = resolve_tokenizer_path(SHIPPED_TOKENIZER)
    assert path is not None and path.endswith("neon_ray/configs/checkpoints/" + SHIPPED_TOKENIZER)
    family = get_family("var")(ModelSpec("var", "var-tiny", (1, 28, 28), 10, {}))
    assert family.vae_path == path
    vq = family.tokenizer(torch.device("cpu"))
    images, _ = get_dataset("fashion_mnist").load("test")
    x = torch.from_numpy(images[:64]).float() / 127.5 - 1
    with torch.no_grad():
        idx = vq.encode_indices(x)
        f_hat = torch.zeros(64, 16, 7, 7)
        for k, r in enumerate(idx):
            f_hat, _ = vq.next_input(k, f_hat, r)
        rec = vq.decode(f_hat)
    assert (rec - x).abs().mean() < 0.2  # a real tokenizer (a random one is ~0.6 off)
    assert torch.cat(idx, 1).unique().numel() > 100  # codes in use


def test_tokenizer_of_another_scale_list_is_one_line(vq_file):
    with pytest.raises(ConfigError, match=r"^model\.options\.vae: vq\.safetensors quantizes the scales 1_2_3_4_5_7; this preset uses 1_2_3_4_6_7"):
        tiny(vq_file, {"patch_nums": [1, 2, 3, 4, 6, 7]}).tokenizer(torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"^model\.options\.vae: vq\.safetensors was made for 6 scales; this preset uses 4 \(1_2_4_7\)$"):
        tiny(vq_file, {"patch_nums": [1, 2, 4, 7]}).tokenizer(torch.device("cpu"))


@pytest.mark.parametrize("settings,field", [
    ({"top_p": 0.0}, "sampler.top_p"),
    ({"top_p": 1.5}, "sampler.top_p"),
    ({"top_k": 0}, "sampler.top_k"),
    ({"guidance": -1}, "sampler.guidance"),
    ({"temperature": 0.9}, "sampler.temperature"),  # extra fields are forbidden
])
def test_sampler_errors_name_the_field(settings, field):
    with pytest.raises(ConfigError) as err:
        get_family("var").validate_sampler(settings)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value), str(err.value)
    assert get_family("var").validate_sampler({}).model_dump() == {"guidance": 1.5, "top_k": 900, "top_p": 0.95}
