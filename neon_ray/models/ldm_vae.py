"""LDM-layout KL autoencoder checkpoints (the CompVis layout: `encoder.down.{i}.block.{j}`, `mid.attn_1.q`, …)
loaded into diffusers' `AutoencoderKL`. This is how the official xAR and MAR releases ship their VAE:
MAR's KL-16 (`kl16.ckpt`, `{"model": state_dict}`), 16 latent channels at stride 16, latents scaled by
0.2325 (MAR `engine_mar.py`: `posterior.sample().mul_(0.2325)`).

The architecture is read off the checkpoint's shapes (widths, levels, blocks per level, latent channels,
which levels attend), so any LDM KL autoencoder loads, not only KL-16. The keys are mapped with diffusers'
own LDM converter; the per-level attention blocks it leaves alone (KL-16's encoder attends at its lowest
resolution, CompVis `attn_resolutions=(16,)`) are mapped here onto `AttnDownEncoderBlock2D` /
`AttnUpDecoderBlock2D`. Files load weights-only (safetensors, or torch.load(weights_only=True)).
"""

from __future__ import annotations

import functools
import os
import re

import torch

from ..errors import ConfigError

FIELD = "model.options.vae"
SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
MAR_KL16_SCALE = 0.2325  # MAR / xAR: z = 0.2325 · posterior sample
_LEVEL_ATTN = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.(norm|q|k|v|proj_out)\.(weight|bias)$")
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Training-only parts some LDM checkpoints carry beside the autoencoder (the LPIPS + discriminator loss).
_TRAINING_ONLY = ("loss.",)


def is_ldm_file(path: str) -> bool:
    """A checkpoint file that is not part of a diffusers folder (no config.json beside it)."""
    return (os.path.isfile(path) and path.lower().endswith(SUFFIXES)
            and not os.path.isfile(os.path.join(os.path.dirname(path), "config.json")))


@functools.lru_cache(maxsize=2)
def _read(path: str, mtime_ns: int) -> dict[str, torch.Tensor]:
    del mtime_ns  # part of the cache key only: a rewritten file is read again
    name = os.path.basename(path)
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            raw = load_file(path)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - a refused pickle, a truncated file, ...: one line either way
        raise ConfigError(f"{FIELD}: cannot read {name} as a weights-only checkpoint: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from None
    for wrapper in ("model", "state_dict"):  # MAR: {"model": ...}; Lightning/LDM: {"state_dict": ...}
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ConfigError(f"{FIELD}: {name} is not a state dict of tensors (nor {{'model': ...}} / {{'state_dict': ...}})")
    prefix = "first_stage_model."  # a whole LDM/SD checkpoint: keep its autoencoder
    if any(k.startswith(prefix) for k in raw):
        raw = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    return {k: v for k, v in raw.items() if not k.startswith(_TRAINING_ONLY)}


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    return _read(path, os.stat(path).st_mtime_ns)


def _levels(sd: dict[str, torch.Tensor], prefix: str) -> int:
    return 1 + max((int(k.split(".")[2]) for k in sd if k.startswith(prefix + ".")), default=-1)


def _attending(sd: dict[str, torch.Tensor], prefix: str) -> set[int]:
    return {int(m.group(2)) for k in sd if (m := _LEVEL_ATTN.match(k)) and m.group(1) == prefix}


def diffusers_config(sd: dict[str, torch.Tensor], name: str) -> dict:
    """The AutoencoderKL config this LDM state dict describes, read from its shapes."""
    need = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight", "post_quant_conv.weight",
            "quant_conv.weight", "encoder.down.0.block.0.conv1.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ConfigError(f"{FIELD}: {name} is not an LDM-layout KL autoencoder (no {', '.join(missing[:3])}); "
                          "give a diffusers AutoencoderKL folder or an LDM/MAR checkpoint such as kl16.ckpt")
    levels = _levels(sd, "encoder.down")
    widths = [int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)]
    blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    latent = int(sd["post_quant_conv.weight"].shape[0])
    if sd["encoder.conv_out.weight"].shape[0] != 2 * latent or sd["quant_conv.weight"].shape[:2] != (2 * latent, 2 * latent):
        raise ConfigError(f"{FIELD}: {name}: encoder output {tuple(sd['encoder.conv_out.weight'].shape[:1])} and quant_conv "
                          f"{tuple(sd['quant_conv.weight'].shape[:2])} do not make a {latent}-channel Gaussian posterior "
                          "(diffusers' AutoencoderKL needs z_channels = embed_dim)")
    enc_attn, dec_attn = _attending(sd, "encoder.down"), _attending(sd, "decoder.up")
    config = {
        "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
        "block_out_channels": widths,
        "layers_per_block": blocks,
        "latent_channels": latent,
        "norm_num_groups": 32,  # CompVis `Normalize`: GroupNorm(32, C, eps=1e-6)
        "down_block_types": ["AttnDownEncoderBlock2D" if i in enc_attn else "DownEncoderBlock2D" for i in range(levels)],
        # diffusers lists decoder blocks from the lowest resolution up; CompVis indexes `up` from the highest
        "up_block_types": ["AttnUpDecoderBlock2D" if levels - 1 - i in dec_attn else "UpDecoderBlock2D" for i in range(levels)],
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }
    if latent == 16 and levels == 5:  # MAR's KL-16 (ch 128, ch_mult 1,1,2,2,4): its published latent scale
        config["scaling_factor"] = MAR_KL16_SCALE
    return config


def convert(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """LDM keys → diffusers keys: diffusers' converter for everything but the per-level attention blocks."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    level_attn = {k: v for k, v in sd.items() if _LEVEL_ATTN.match(k)}
    rest = {k: v for k, v in sd.items() if k not in level_attn}
    out = convert_ldm_vae_checkpoint(rest, config)
    levels = len(config["block_out_channels"])
    for key, value in level_attn.items():
        where, level, j, part, kind = _LEVEL_ATTN.match(key).groups()
        block = f"encoder.down_blocks.{level}" if where == "encoder.down" else f"decoder.up_blocks.{levels - 1 - int(level)}"
        # CompVis q/k/v/proj_out are 1×1 convolutions; diffusers' are linear layers
        out[f"{block}.attentions.{j}.{_ATTN_NAMES[part]}.{kind}"] = value.flatten(1) if value.dim() == 4 else value
    return out


def load_ldm_vae(path: str):
    """A frozen-ready diffusers AutoencoderKL holding an LDM-layout checkpoint's weights (strictly)."""
    from diffusers import AutoencoderKL

    name = os.path.basename(path)
    sd = read_state_dict(path)
    config = diffusers_config(sd, name)
    vae = AutoencoderKL(**{k: v for k, v in config.items() if k != "scaling_factor"})
    weights = convert(sd, config)
    mine = vae.state_dict()
    missing = sorted(set(mine) - set(weights))
    # diffusers' converter drops keys it does not know; find them by storage (it passes tensors through as views)
    used = {t.data_ptr() for t in weights.values()}
    unexpected = sorted({k for k, v in sd.items() if v.numel() and v.data_ptr() not in used} | (set(weights) - set(mine)))
    shapes = [k for k in set(mine) & set(weights) if mine[k].shape != weights[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", sorted(shapes))) if keys]
        raise ConfigError(f"{FIELD}: {name} does not load as an LDM KL autoencoder: {'; '.join(parts)}")
    vae.load_state_dict(weights, strict=True)
    return vae
