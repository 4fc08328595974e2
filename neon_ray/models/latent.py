"""Latent space: a frozen diffusers `AutoencoderKL` between images and the denoiser (LDM, Rombach et al. 2022).

`model.options.vae` is a diffusers folder (save_pretrained), a hub id, or one LDM-layout checkpoint file
such as MAR's KL-16 `kl16.ckpt`, the official xAR VAE (read by ldm_vae.py).

A family trains and samples in z = (E(x) − shift)·scale and decodes x = D(z / scale + shift) at the
end (DiT: scale 0.18215 for the SD VAE, no shift). The VAE is held by the family, never by the
network, so it is not in any checkpoint and Neon never merges it. diffusers is imported only here,
and only when `model.options.vae` is set.
"""

from __future__ import annotations

import json
import os
import re

import torch

from ..errors import ConfigError
from . import ldm_vae

FIELD = "model.options.vae"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_vae_source(source: str) -> str:
    """A local diffusers folder for `source` (a folder, or a file inside one), an LDM-layout checkpoint file,
    else a hub id unchanged."""
    path = os.path.abspath(os.path.expanduser(source))
    if ldm_vae.is_ldm_file(path):
        return path
    if os.path.isfile(path):
        path = os.path.dirname(path)  # e.g. .../vae/config.json or .../vae/diffusion_pytorch_model.safetensors
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{FIELD}: {source} has no config.json; expected a diffusers AutoencoderKL folder (save_pretrained)")
        return path
    if _HUB_ID.match(source):
        return source
    raise ConfigError(f"{FIELD}: not found: {source} (a local AutoencoderKL folder, or a hub id such as stabilityai/sd-vae-ft-ema when online)")


def vae_config(source: str) -> dict:
    """The AutoencoderKL config (a local folder's config.json; hub ids through diffusers)."""
    resolved = resolve_vae_source(source)
    if os.path.isfile(resolved):
        return ldm_vae.diffusers_config(ldm_vae.read_state_dict(resolved), os.path.basename(resolved))
    if os.path.isdir(resolved):
        with open(os.path.join(resolved, "config.json")) as fh:
            return json.load(fh)
    return dict(_load_vae(resolved).config)


def latent_shape(config: dict, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(latent_channels, H/f, W/f) with f = 2^(levels − 1): every encoder level but the last halves H and W."""
    c, h, w = image_shape
    if config.get("in_channels", 3) != c:
        raise ConfigError(f"{FIELD}: the VAE encodes {config.get('in_channels', 3)}-channel images, the data has {c} channels (image shape {tuple(image_shape)})")
    factor = 2 ** (len(config.get("block_out_channels", (64,))) - 1)
    if h % factor or w % factor:
        raise ConfigError(f"{FIELD}: the VAE downsamples by {factor}, which does not divide the {h}×{w} images")
    return (int(config.get("latent_channels", 4)), h // factor, w // factor)


def _load_vae(resolved: str):
    from diffusers import AutoencoderKL

    if os.path.isfile(resolved):
        return ldm_vae.load_ldm_vae(resolved)
    try:
        return AutoencoderKL.from_pretrained(resolved, local_files_only=os.path.isdir(resolved))
    except Exception as exc:  # noqa: BLE001 - diffusers/hub raise many types (offline, missing weights, ...)
        raise ConfigError(f"{FIELD}: cannot load AutoencoderKL from {resolved}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from None


class LatentSpace:
    """Images (B, C, H, W) in [-1, 1] ↔ latents (B, *shape). The VAE loads on first use and stays frozen."""

    def __init__(self, source: str, image_shape: tuple[int, int, int], scaling_factor: float | None = None, shift_factor: float | None = None):
        self.source = resolve_vae_source(source)
        config = vae_config(self.source)
        self.shape = latent_shape(config, image_shape)
        if scaling_factor is None and os.path.isfile(self.source) and "scaling_factor" not in config:
            raise ConfigError(f"model.options.vae_scaling_factor: required for {os.path.basename(self.source)} (an LDM checkpoint "
                              f"carries no latent scale; MAR's KL-16 uses {ldm_vae.MAR_KL16_SCALE})")
        self.scale = float(scaling_factor if scaling_factor is not None else config.get("scaling_factor", 0.18215))
        self.shift = float(shift_factor if shift_factor is not None else (config.get("shift_factor") or 0.0))
        self._vae = None

    def vae(self, device: torch.device):
        if self._vae is None:
            self._vae = _load_vae(self.source).eval().requires_grad_(False)
        if next(self._vae.parameters()).device != device:
            self._vae.to(device)
        return self._vae

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """z ~ q(z | x), scaled; the posterior draw comes from `generator` (DiT samples the posterior in training)."""
        posterior = self.vae(images.device).encode(images.float()).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(images.device)
        return (posterior.mean + posterior.std * noise - self.shift) * self.scale  # (B, *shape)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.vae(z.device)
        return vae.decode((z / self.scale + self.shift).to(next(vae.parameters()).dtype)).sample.float().clamp(-1, 1)
