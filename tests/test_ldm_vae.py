"""LDM-layout VAE checkpoints (MAR's KL-16, the official xAR VAE) loaded into diffusers' AutoencoderKL.

The check is against an independent forward pass written here from the CompVis architecture (GroupNorm(32),
SiLU, ResNet blocks, 1×1-conv single-head attention, asymmetric-pad stride-2 downsampling, nearest ×2
upsampling), run on the same random weights: the loaded diffusers model must compute the same posterior
mean and the same decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neon_ray.errors import ConfigError
from neon_ray.models import ModelSpec, get_family
from neon_ray.models import ldm_vae
from neon_ray.models.latent import LatentSpace


# -- an LDM-layout state dict ------------------------------------------------------------------


def ldm_state_dict(ch=32, mult=(1, 2), blocks=1, z=4, enc_attn=(1,), dec_attn=(), device="cpu", seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def t(*shape, scale=None):
        if device == "meta":
            return torch.empty(shape, device="meta")
        fan_in = shape[1] * shape[2] * shape[3] if len(shape) == 4 else shape[0]
        return torch.randn(shape, generator=g) * (scale if scale is not None else fan_in**-0.5)

    def conv(name, cin, cout, k=3):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = t(cout, cin, k, k), t(cout, scale=0.1)

    def norm(name, c):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + t(c, scale=0.1), t(c, scale=0.1)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout), norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    widths = [ch * m for m in mult]
    conv("encoder.conv_in", 3, ch)
    cin = ch
    for i, w in enumerate(widths):
        for j in range(blocks):
            res(f"encoder.down.{i}.block.{j}", cin, w)
            cin = w
            if i in enc_attn:
                attn(f"encoder.down.{i}.attn.{j}", w)
        if i < len(widths) - 1:
            conv(f"encoder.down.{i}.downsample.conv", w, w)
    res("encoder.mid.block_1", cin, cin), attn("encoder.mid.attn_1", cin), res("encoder.mid.block_2", cin, cin)
    norm("encoder.norm_out", cin), conv("encoder.conv_out", cin, 2 * z)
    conv("quant_conv", 2 * z, 2 * z, 1), conv("post_quant_conv", z, z, 1)
    cin = widths[-1]
    conv("decoder.conv_in", z, cin)
    res("decoder.mid.block_1", cin, cin), attn("decoder.mid.attn_1", cin), res("decoder.mid.block_2", cin, cin)
    for i in reversed(range(len(widths))):
        for j in range(blocks + 1):
            res(f"decoder.up.{i}.block.{j}", cin, widths[i])
            cin = widths[i]
            if i in dec_attn:
                attn(f"decoder.up.{i}.attn.{j}", cin)
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin)
    norm("decoder.norm_out", cin), conv("decoder.conv_out", cin, 3)
    return sd


# -- the CompVis forward pass, written out ------------------------------------------------------


class Reference:
    def __init__(self, sd: dict, levels: int, blocks: int):
        self.sd, self.levels, self.blocks = sd, levels, blocks

    def conv(self, x, name, stride=1, pad=None):
        w = self.sd[f"{name}.weight"]
        return F.conv2d(x, w, self.sd[f"{name}.bias"], stride, w.shape[-1] // 2 if pad is None else pad)

    def norm(self, x, name):
        return F.group_norm(x, 32, self.sd[f"{name}.weight"], self.sd[f"{name}.bias"], eps=1e-6)

    def res(self, x, name):
        h = self.conv(F.silu(self.norm(x, f"{name}.norm1")), f"{name}.conv1")
        h = self.conv(F.silu(self.norm(h, f"{name}.norm2")), f"{name}.conv2")
        skip = self.conv(x, f"{name}.nin_shortcut") if f"{name}.nin_shortcut.weight" in self.sd else x
        return skip + h

    def attn(self, x, name):
        b, c, hh, ww = x.shape
        h = self.norm(x, f"{name}.norm")
        q, k, v = (self.conv(h, f"{name}.{p}").reshape(b, c, hh * ww) for p in ("q", "k", "v"))
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c**-0.5, dim=-1)  # (b, queries, keys)
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, hh, ww)
        return x + self.conv(out, f"{name}.proj_out")

    def maybe_attn(self, x, name):
        return self.attn(x, name) if f"{name}.q.weight" in self.sd else x

    def mid(self, h, side):
        h = self.res(h, f"{side}.mid.block_1")
        return self.res(self.attn(h, f"{side}.mid.attn_1"), f"{side}.mid.block_2")

    def encode_mean(self, x):
        h = self.conv(x, "encoder.conv_in")
        for i in range(self.levels):
            for j in range(self.blocks):
                h = self.maybe_attn(self.res(h, f"encoder.down.{i}.block.{j}"), f"encoder.down.{i}.attn.{j}")
            if i < self.levels - 1:
                h = self.conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", stride=2, pad=0)
        h = self.conv(F.silu(self.norm(self.mid(h, "encoder"), "encoder.norm_out")), "encoder.conv_out")
        moments = self.conv(h, "quant_conv")
        return moments[:, : moments.shape[1] // 2]

    def decode(self, z):
        h = self.mid(self.conv(self.conv(z, "post_quant_conv"), "decoder.conv_in"), "decoder")
        for i in reversed(range(self.levels)):
            for j in range(self.blocks + 1):
                h = self.maybe_attn(self.res(h, f"decoder.up.{i}.block.{j}"), f"decoder.up.{i}.attn.{j}")
            if i > 0:
                h = self.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{i}.upsample.conv")
        return self.conv(F.silu(self.norm(h, "decoder.norm_out")), "decoder.conv_out")


@pytest.fixture(scope="module")
def ldm_file(tmp_path_factory):
    """The MAR release's file layout: torch.save({"model": state_dict}), plus a training-loss key to be ignored."""
    sd = ldm_state_dict(dec_attn=(0,))
    path = tmp_path_factory.mktemp("ldm") / "kl-tiny.ckpt"
    torch.save({"model": {**sd, "loss.logvar": torch.zeros(())}}, path)
    return path, sd


def test_loaded_vae_computes_the_compvis_forward(ldm_file):
    path, sd = ldm_file
    vae = ldm_vae.load_ldm_vae(str(path)).eval()
    ref = Reference(sd, levels=2, blocks=1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        torch.testing.assert_close(mean, ref.encode_mean(x), atol=1e-4, rtol=1e-4)
        z = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(vae.decode(z).sample, ref.decode(z), atol=1e-4, rtol=1e-4)
    assert vae.config.down_block_types == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    assert vae.config.up_block_types == ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]  # CompVis up.0 = diffusers' last


def test_family_trains_in_an_ldm_latent_space(ldm_file, tmp_path):
    path, sd = ldm_file
    from safetensors.torch import save_file

    flat = tmp_path / "kl-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(flat))
    for source in (path, flat):
        space = LatentSpace(str(source), (3, 16, 16), scaling_factor=0.5)
        assert space.shape == (4, 8, 8)
        images = torch.rand(2, 3, 16, 16) * 2 - 1
        z = space.encode(images, torch.Generator().manual_seed(0))
        assert z.shape == (2, 4, 8, 8) and space.decode(z).shape == (2, 3, 16, 16)
    fam = get_family("xar")(ModelSpec("xar", "xar-tiny", (3, 16, 16), 10, {"vae": str(path), "vae_scaling_factor": 0.5, "patch": 1, "width": 32}))
    net = fam.build()
    assert fam.data_shape == (4, 8, 8) and not any(k.startswith(("encoder.down", "quant_conv")) for k in net.state_dict())
    loss = fam.training_loss(net, torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_mar_kl16_key_set_maps_onto_autoencoder_kl():
    """The full KL-16 layout (ch 128, ch_mult 1,1,2,2,4, two blocks, encoder attention at 16², z 16), on meta."""
    from diffusers import AutoencoderKL

    sd = ldm_state_dict(ch=128, mult=(1, 1, 2, 2, 4), blocks=2, z=16, enc_attn=(4,), device="meta")
    config = ldm_vae.diffusers_config(sd, "kl16.ckpt")
    assert config["block_out_channels"] == [128, 128, 256, 256, 512] and config["latent_channels"] == 16
    assert config["scaling_factor"] == ldm_vae.MAR_KL16_SCALE
    with torch.device("meta"):
        vae = AutoencoderKL(**{k: v for k, v in config.items() if k != "scaling_factor"})
    converted = ldm_vae.convert(sd, config)
    mine = vae.state_dict()
    assert set(converted) == set(mine) and len(converted) == len(sd)
    assert all(converted[k].shape == mine[k].shape for k in mine)
    assert 60e6 < sum(v.numel() for v in sd.values()) < 120e6


def test_bad_vae_checkpoints_name_the_field_and_file(ldm_file, tmp_path):
    path, sd = ldm_file
    broken = dict(sd)
    del broken["encoder.down.1.attn.0.q.bias"]
    broken["encoder.extra.weight"] = torch.zeros(3)
    torch.save({"model": broken}, tmp_path / "broken.ckpt")
    with pytest.raises(ConfigError, match=r"^model\.options\.vae: broken\.ckpt does not load as an LDM KL autoencoder: "
                                          r"missing encoder\.down_blocks\.1\.attentions\.0\.to_q\.bias; unexpected encoder\.extra\.weight"):
        ldm_vae.load_ldm_vae(str(tmp_path / "broken.ckpt"))
    torch.save({"model": {"weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"^model\.options\.vae: other\.pt is not an LDM-layout KL autoencoder \(no encoder\.conv_in"):
        LatentSpace(str(tmp_path / "other.pt"), (3, 16, 16))
    torch.save({"model": sd, "hook": ConfigError("a pickled object")}, tmp_path / "pickled.ckpt")  # refused, never unpickled
    with pytest.raises(ConfigError, match=r"^model\.options\.vae: cannot read pickled\.ckpt as a weights-only checkpoint"):
        LatentSpace(str(tmp_path / "pickled.ckpt"), (3, 16, 16))
    with pytest.raises(ConfigError, match=r"^model\.options\.vae_scaling_factor: required for kl-tiny\.ckpt"):
        LatentSpace(str(path), (3, 16, 16))
    with pytest.raises(ConfigError, match=r"^model\.options\.vae: xAR-B runs on MAR's KL-16 latents \(16 channels, stride 16\); "
                                          r"this VAE gives 4 channels at stride 2"):
        get_family("xar")(ModelSpec("xar", "xAR-B", (3, 16, 16), 10, {"vae": str(path), "vae_scaling_factor": 0.5}))
