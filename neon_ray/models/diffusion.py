"""VP diffusion with ε-prediction (DDPM), cosine schedule, DDIM/ancestral samplers and classifier-free guidance."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import ModelFamily, SamplerSettings
from .registry import register_family
from .unet import UNet


class DiffusionSampler(SamplerSettings):
    name: Literal["ddim", "ancestral"] = Field("ddim", description="ddim (η configurable) or ancestral (DDPM, η = 1).")
    steps: int = Field(20, ge=1, le=1000, description="Denoising steps.")
    guidance: float = Field(1.0, ge=0, description="CFG scale γ: ε = ε_u + γ(ε_c − ε_u); 1 = conditional only.")
    eta: float = Field(0.0, ge=0, le=1, description="DDIM stochasticity (0 = deterministic).")
    clip_denoised: bool = Field(True, description="Clip the predicted x₀ to [-1, 1] at every step.")


def cosine_alpha_bar(num_steps: int, s: float = 0.008) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1 (Nichol & Dhariwal 2021, Eq. 17), β clipped at 0.999."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


@register_family
class DiffusionFamily(ModelFamily):
    name = "diffusion"
    # One line per size. FID notes live in jobs/configs/*.yaml beside the runs that measured them.
    presets = {
        "unet-tiny": dict(backbone="unet", channels=(16, 32, 32), blocks_per_level=1, attention_levels=(), dropout=0.0),
        "unet-small": dict(backbone="unet", channels=(32, 64, 64), blocks_per_level=1, attention_levels=(2,), dropout=0.0),
        "unet-p2": dict(backbone="unet", channels=(64, 128), blocks_per_level=2, attention_levels=(1,), dropout=0.0, patch=2),
        "unet-p2s": dict(backbone="unet", channels=(48, 96), blocks_per_level=1, attention_levels=(1,), dropout=0.0, patch=2),
        "unet-base": dict(backbone="unet", channels=(64, 128, 128), blocks_per_level=2, attention_levels=(2,), dropout=0.1),
    }
    sampler_schema = DiffusionSampler
    num_timesteps = 1000
    label_dropout = 0.1  # p(unconditional) in training, for CFG

    def __init__(self, spec):
        super().__init__(spec)
        self.alpha_bar = cosine_alpha_bar(self.num_timesteps)  # float64 (T,)

    def build(self) -> nn.Module:
        h = self.hparams
        c, _, _ = self.spec.image_shape
        return UNet(
            in_channels=c,
            num_classes=self.spec.num_classes,
            channels=tuple(h["channels"]),
            blocks_per_level=h["blocks_per_level"],
            attention_levels=tuple(h["attention_levels"]),
            dropout=h["dropout"],
            patch=h.get("patch", 1),
        )

    def training_loss(self, net, images, labels, generator):
        b = images.shape[0]
        dev = images.device
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator).to(dev)
        noise = torch.randn(images.shape, generator=generator).to(dev, images.dtype)
        drop = torch.rand(b, generator=generator).to(dev) < self.label_dropout
        y = torch.where(drop, torch.full_like(labels, self.spec.num_classes), labels)
        ab = self.alpha_bar.to(dev)[t].float()[:, None, None, None]
        x_t = ab.sqrt() * images + (1 - ab).sqrt() * noise  # q(x_t | x_0), DDPM Eq. 4
        return F.mse_loss(net(x_t, t, y).float(), noise.float())

    def _eps(self, net, x, t, labels, guidance):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if guidance == 1.0:
            return net(x, tt, labels).float()
        null = torch.full_like(labels, self.spec.num_classes)
        if guidance == 0.0:
            return net(x, tt, null).float()
        # Conditional and unconditional passes batched into one forward.
        eps_c, eps_u = net(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).float().chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    @torch.no_grad()
    def sample(self, net, labels, seeds, settings):
        s = settings if isinstance(settings, DiffusionSampler) else DiffusionSampler.model_validate(settings)
        dev = labels.device
        shape = self.spec.image_shape
        gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)  # (B, C, H, W), x_T
        eta = 1.0 if s.name == "ancestral" else s.eta
        ab = self.alpha_bar
        ts = torch.linspace(self.num_timesteps - 1, 0, s.steps).round().long().tolist()
        for i, t in enumerate(ts):
            ab_t = float(ab[t])
            ab_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            eps = self._eps(net, x, t, labels, s.guidance)
            x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
            if s.clip_denoised:
                x0 = x0.clamp(-1, 1)
                eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
            # DDIM update (Song et al. 2021, Eq. 12); σ from Eq. 16.
            sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) if ab_prev < 1 else 0.0
            x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                z = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)
                x = x + sigma * z
        return x.clamp(-1, 1)
