"""What the denoising families (diffusion, edm, flow) share: backbone presets, options, latent space, CFG.

A preset names a backbone (`unet-*` or a DiT size) plus the family's defaults. `model.options`
may override any field the preset's backbone or family knows; anything else is a one-line error.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from ..errors import NeonError
from .base import ModelFamily, ModelSpec, SamplerSettings
from .dit import DIT_PRESETS, DiT, check_patch_fits
from .guidance import classifier_free_guidance, tile
from .unet import UNet

# U-Net sizes (a small ADM-style U-Net, see unet.py); `patch` pixel-unshuffles p×p patches into channels.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "unet-tiny": dict(channels=(16, 32, 32), blocks_per_level=1, attention_levels=(), dropout=0.0),
    "unet-small": dict(channels=(32, 64, 64), blocks_per_level=1, attention_levels=(2,), dropout=0.0),
    "unet-p2": dict(channels=(64, 128), blocks_per_level=2, attention_levels=(1,), dropout=0.0, patch=2),
    "unet-p2s": dict(channels=(48, 96), blocks_per_level=1, attention_levels=(1,), dropout=0.0, patch=2),
    "unet-base": dict(channels=(64, 128, 128), blocks_per_level=2, attention_levels=(2,), dropout=0.1),
}
UNET_FIELDS = {"channels", "blocks_per_level", "attention_levels", "dropout", "patch"}
DIT_FIELDS = {"depth", "width", "heads", "patch", "mlp_ratio", "learn_sigma"}
LATENT_FIELDS = {"vae", "vae_scaling_factor", "vae_shift_factor"}


def presets_for(unet_defaults: dict[str, Any], dit_defaults: dict[str, Any], official_dit_defaults: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A family's preset table: every backbone size with the family's defaults.

    `official_dit_defaults` apply to the DiT-* sizes (e.g. learn_sigma so official checkpoints load),
    `dit_defaults` to the small dit-* sizes.
    """
    table = {name: dict(backbone="unet", **hp, **unet_defaults) for name, hp in UNET_PRESETS.items()}
    for name, hp in DIT_PRESETS.items():
        defaults = official_dit_defaults if name.startswith("DiT-") else dit_defaults
        table[name] = dict(backbone="dit", **hp, **defaults)
    return table


class DenoiserFamily(ModelFamily):
    """A family whose network is f(x, noise level, label) on images or VAE latents."""

    family_fields: ClassVar[set[str]] = set()  # options the family itself reads (schedule, sigma_data, ...)
    label_dropout: ClassVar[float] = 0.1  # p(unconditional) in training, for CFG

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        h = self.hparams
        self.latent = None
        if h.get("vae"):
            from .latent import LatentSpace

            self.latent = LatentSpace(h["vae"], spec.image_shape, h.get("vae_scaling_factor"), h.get("vae_shift_factor"))
        self.data_shape: tuple[int, int, int] = self.latent.shape if self.latent else tuple(spec.image_shape)  # (C, H, W) the network sees
        if h["backbone"] == "dit":
            check_patch_fits(self.data_shape[1:], h["patch"], "model.preset")
        self.learn_sigma = bool(h.get("learn_sigma", False))
        self._compiled: tuple[nn.Module, nn.Module] | None = None

    @classmethod
    def option_fields(cls, preset: str) -> set[str]:
        backbone = cls.presets[preset]["backbone"]
        return (UNET_FIELDS if backbone == "unet" else DIT_FIELDS) | LATENT_FIELDS | cls.family_fields

    # -- network -------------------------------------------------------------------------------
    def build(self) -> nn.Module:
        h = self.hparams
        c, height, width = self.data_shape
        if h["backbone"] == "unet":
            return UNet(in_channels=c, num_classes=self.spec.num_classes, channels=tuple(h["channels"]),
                        blocks_per_level=h["blocks_per_level"], attention_levels=tuple(h["attention_levels"]),
                        dropout=h["dropout"], patch=h.get("patch", 1))
        return DiT(input_size=(height, width), in_channels=c, num_classes=self.spec.num_classes, depth=h["depth"],
                   width=h["width"], heads=h["heads"], patch=h["patch"], learn_sigma=self.learn_sigma,
                   mlp_ratio=h.get("mlp_ratio", 4.0))

    def load_state_dict(self, net: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
        self._check_input_fits(net, state_dict, source)
        super().load_state_dict(net, state_dict, source)

    def _check_input_fits(self, net: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Name the input-size/channel disagreement before the generic key/shape listing."""
        mine = net.state_dict()
        if "pos_embed" not in mine:  # the U-Net: the generic key/shape listing says enough
            return
        stem = "x_embedder.proj.weight"
        where = "VAE latents" if self.latent else "images"
        if stem in state_dict and state_dict[stem].shape[1] != mine[stem].shape[1]:
            raise NeonError(f"model.checkpoint: {source} takes {state_dict[stem].shape[1]}-channel inputs; this run feeds {where} of shape {self.data_shape}")
        if "pos_embed" in state_dict and state_dict["pos_embed"].shape != mine["pos_embed"].shape:
            tokens, p = state_dict["pos_embed"].shape[1], self.hparams["patch"]
            side = int(round(tokens**0.5)) * p
            raise NeonError(f"model.checkpoint: {source} has {tokens} patch tokens (a {side}×{side} input at patch {p}); "
                            f"this run feeds {where} of shape {self.data_shape} (check data / model.options.vae)")

    def start_sampling(self, net: nn.Module, settings, seeds: list[int]) -> tuple[SamplerSettings, nn.Module, list[torch.Generator]]:
        """(typed settings, the network to call (compiled if asked), one generator per sample)."""
        s = self.validate_sampler(settings)
        return s, self.network(net, s.compile), self.sample_generators(seeds)

    def network(self, net: nn.Module, compile: bool) -> nn.Module:
        """`net`, or its torch.compile'd twin (cached: a sampling actor calls sample() many times)."""
        if not compile:
            return net
        if self._compiled is None or self._compiled[0] is not net:
            self._compiled = (net, torch.compile(net))
        return self._compiled[1]

    # -- data ----------------------------------------------------------------------------------
    def to_data(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training inputs: the images, or their scaled VAE latents (posterior draw from `generator`)."""
        return self.latent.encode(images, generator) if self.latent else images

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.latent.decode(x) if self.latent else x.clamp(-1, 1)

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Replace a `label_dropout` fraction by the null label (index num_classes) to train CFG."""
        drop = torch.rand(labels.shape[0], generator=generator).to(labels.device) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, self.spec.num_classes), labels)

    def noise_like_data(self, generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
        """One standard normal draw of the data shape per sample, each from its own generator: (B, C, H, W)."""
        return torch.stack([torch.randn(self.data_shape, generator=g) for g in generators]).to(device)

    def guided(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(CFG-combined prediction on the first C channels, the conditional pass's extra channels or None)."""
        c = x.shape[1]
        out, cond = classifier_free_guidance(lambda y, k: net(tile(x, k), tile(t, k), y).float(), labels,
                                             self.spec.num_classes, guidance)
        return out[:, :c], (cond[:, c:] if cond.shape[1] > c else None)


class DenoiserSampler(SamplerSettings):
    guidance: float = Field(1.0, ge=0, description="CFG scale γ: out = out_u + γ(out_c − out_u); 1 = conditional only, 0 = unconditional.")
    compile: bool = Field(False, description="torch.compile the network for sampling (worth it on GPUs; the first call compiles).")
