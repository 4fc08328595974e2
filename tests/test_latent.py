"""Latent space: a tiny randomly initialised diffusers AutoencoderKL saved to disk, used by every denoising family."""

from __future__ import annotations

import pytest
import torch

from neon_ray.errors import ConfigError, NeonError
from neon_ray.models import ModelSpec, get_family
from neon_ray.models.latent import LatentSpace


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """32×32 RGB ↔ 4×8×8 latents (three encoder levels: ×4 downsampling), a few thousand weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, mid_block_add_attention=False)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path, safe_serialization=True)
    return str(path)


def spec(family: str, preset: str, vae: str, image_shape=(3, 32, 32), **options) -> ModelSpec:
    return ModelSpec(family, preset, image_shape, 10, {"vae": vae, **options})


@pytest.mark.parametrize("family,preset,settings", [
    ("diffusion", "dit-tiny", {"steps": 2, "guidance": 2.0}),
    ("edm", "unet-tiny", {"steps": 2, "guidance": 1.5}),
    ("flow", "dit-tiny", {"name": "euler", "steps": 2}),
])
def test_families_train_and_sample_in_latent_space(vae_dir, family, preset, settings):
    options = {"patch": 2} if preset.startswith("dit") else {}
    fam = get_family(family)(spec(family, preset, vae_dir, **options))
    assert fam.data_shape == (4, 8, 8)
    torch.manual_seed(0)
    net = fam.build()
    assert not any("vae" in k or "encoder" in k for k in net.state_dict())  # the VAE never enters the checkpoint
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    loss = fam.training_loss(net, images, torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    loss.backward()
    vae = fam.latent.vae(torch.device("cpu"))
    assert torch.isfinite(loss) and all(p.grad is None and not p.requires_grad for p in vae.parameters())
    s = fam.sampler_schema.model_validate(settings)
    net.eval()
    labels, seeds = torch.tensor([4, 5]), [1, 2]
    out = fam.sample(net, labels, seeds, s)
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1
    alone = torch.cat([fam.sample(net, labels[i : i + 1], seeds[i : i + 1], s) for i in range(2)])
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)


def test_encode_scales_and_draws_from_the_generator(vae_dir):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    default = LatentSpace(vae_dir, (3, 32, 32))
    assert default.scale == pytest.approx(0.18215) and default.shift == 0.0  # the SD-VAE factor, from the config
    half = LatentSpace(vae_dir, (3, 32, 32), scaling_factor=0.5)
    z1 = default.encode(images, torch.Generator().manual_seed(0))
    z2 = half.encode(images, torch.Generator().manual_seed(0))
    assert z1.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z2, z1 * (0.5 / 0.18215), atol=1e-5, rtol=1e-5)
    assert torch.equal(z1, default.encode(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(z1, default.encode(images, torch.Generator().manual_seed(1)))  # the posterior is sampled
    assert default.decode(z1).shape == (2, 3, 32, 32)


def test_image_shape_must_fit_the_vae(vae_dir):
    with pytest.raises(ConfigError, match=r"^model\.options\.vae: the VAE encodes 3-channel images, the data has 1 channels"):
        get_family("diffusion")(spec("diffusion", "dit-tiny", vae_dir, image_shape=(1, 28, 28)))
    with pytest.raises(ConfigError, match=r"^model\.options\.vae: the VAE downsamples by 4, which does not divide the 30×30"):
        get_family("edm")(spec("edm", "unet-tiny", vae_dir, image_shape=(3, 30, 30)))
    with pytest.raises(ConfigError, match=r"^model\.preset: patch 4 does not divide the 6×6"):
        get_family("flow")(spec("flow", "dit-tiny", vae_dir, image_shape=(3, 24, 24)))  # 24 px → 6×6 latents
    with pytest.raises(ConfigError, match=r"^model\.options\.vae: not found: /nonexistent/vae"):
        get_family("flow")(spec("flow", "dit-tiny", "/nonexistent/vae"))


def test_checkpoint_for_other_latent_sizes_names_the_field(vae_dir):
    small = get_family("diffusion")(spec("diffusion", "dit-tiny", vae_dir, patch=2))  # 8×8 latents → 16 tokens
    large = get_family("diffusion")(spec("diffusion", "dit-tiny", vae_dir, image_shape=(3, 64, 64), patch=2))  # 16×16 → 64
    with pytest.raises(NeonError, match=r"^model\.checkpoint: small\.safetensors has 16 patch tokens .*VAE latents of shape \(4, 16, 16\)"):
        large.load_state_dict(large.build(), small.build().state_dict(), "small.safetensors")
