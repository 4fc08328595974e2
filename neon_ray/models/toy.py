"""Toy low-dimensional generators for the paper's 2-D experiment (App. B): MLP DDPM and MLP flow matching.

Samples are raw float vectors (B, D), not images: no [-1, 1] scaling, no clamping. There are no
classes (`num_classes` = 1, labels ignored).
- `toy-ddpm`: ε-prediction DDPM (Ho et al. 2020) with the cosine schedule (Nichol & Dhariwal 2021).
  Its sampler scales the score, i.e. ε̂, by ζ (the paper's knob: ζ > 1 mode-seeking, ζ < 1 diversity-
  seeking), with ancestral (DDPM) or DDIM updates over `steps` strided timesteps. Few steps are already
  mode-seeking: with the exact score of the App. B target, 20 ancestral steps give ≈ 0.8× the target
  covariance (each strided step drops x̂₀'s posterior spread), 200 steps ≈ 1.0×; ζ = 0.9 at 20 steps ≈ 1.0×.
- `toy-flow`: velocity model on the linear interpolant x_t = (1 − t)·z + t·x (rectified flow, Liu et al.
  2023; flow matching, Lipman et al. 2023), Euler sampling from temperature-scaled noise τ·z.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import ModelFamily, SamplerSettings
from .diffusion import cosine_alpha_bar
from .registry import register_family
from .unet import timestep_embedding


class ToyMLP(nn.Module):
    """g(x, t): `blocks` residual blocks of `hidden` units, the time embedding added at every block."""

    def __init__(self, dim: int, hidden: int, blocks: int, time_scale: float):
        super().__init__()
        self.time_scale = time_scale  # maps t to ~[0, 1000] for the sinusoidal embedding
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(blocks))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = self.inp.weight.dtype  # bf16 under DeepSpeed's bf16 engine; inputs follow the weights
        emb = self.time(timestep_embedding(t.float() * self.time_scale, self.inp.out_features).to(dtype))  # (B, H)
        h = self.inp(x.to(dtype))  # (B, H)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)  # (B, D)


class _ToyFamily(ModelFamily):
    presets = {
        "mlp-tiny": dict(hidden=16, blocks=2),
        "mlp-paper": dict(hidden=32, blocks=4),  # App. B: 4 blocks × 32 units
    }
    time_scale = 1.0

    @property
    def dim(self) -> int:
        (d,) = self.spec.image_shape
        return d

    def build(self) -> nn.Module:
        h = self.hparams
        return ToyMLP(self.dim, int(h["hidden"]), int(h["blocks"]), self.time_scale)

    def _noise(self, seeds: list[int], draws: int, device) -> torch.Tensor:
        """All Gaussian draws of a sampling run, (B, draws, D): row i from seeds[i] only, in one call per sample."""
        return torch.stack([torch.randn(draws, self.dim, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]).to(device)


class ToyDDPMSampler(SamplerSettings):
    name: Literal["ancestral", "ddim"] = Field("ancestral", description="ancestral (DDPM, η = 1) or ddim (η = 0).")
    steps: int = Field(20, ge=1, le=1000, description="Denoising steps (strided over the 1000 training timesteps).")
    score_scale: float = Field(1.0, gt=0, description="ζ: ε̂ (the score) is multiplied by ζ; > 1 mode-seeking, < 1 diversity-seeking.")


@register_family
class ToyDDPMFamily(_ToyFamily):
    name = "toy-ddpm"
    sampler_schema = ToyDDPMSampler
    num_timesteps = 1000

    def __init__(self, spec):
        super().__init__(spec)
        self.alpha_bar = cosine_alpha_bar(self.num_timesteps)  # float64 (T,)

    def training_loss(self, net, images, labels, generator):
        x = images.float()  # (B, D) raw coordinates
        b, dev = x.shape[0], x.device
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator).to(dev)
        noise = torch.randn(x.shape, generator=generator).to(dev)
        ab = self.alpha_bar.to(dev)[t].float()[:, None]
        x_t = ab.sqrt() * x + (1 - ab).sqrt() * noise  # q(x_t | x_0), DDPM Eq. 4
        return F.mse_loss(net(x_t, t).float(), noise)

    @torch.no_grad()
    def sample(self, net, labels, seeds, settings):
        s = self.validate_sampler(settings)
        dev = labels.device
        noise = self._noise(seeds, s.steps + 1, dev)  # x_T, then one draw per ancestral step
        x = noise[:, 0]  # (B, D)
        eta = 1.0 if s.name == "ancestral" else 0.0
        # DDIM's uniform sub-sequence τ_i = ⌊i·T/S⌋ (Song et al. 2021): it starts at T − T/S, not at
        # T − 1, where the clipped cosine schedule has ᾱ ≈ 2e-9 and x̂₀ = (x − √(1−ᾱ)ε̂)/√ᾱ blows up unclipped.
        ts = [i * self.num_timesteps // s.steps for i in reversed(range(s.steps))]
        for i, t in enumerate(ts):
            ab_t = float(self.alpha_bar[t])
            ab_prev = float(self.alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            eps = s.score_scale * net(x, torch.full((x.shape[0],), t, device=dev)).float()  # ζ·ε̂ = −ζ·√(1−ᾱ)·score
            x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
            # DDIM update (Song et al. 2021, Eq. 12), σ from Eq. 16; η = 1 is DDPM's ancestral step.
            sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) if ab_prev < 1 else 0.0
            x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * noise[:, i + 1]
        return x


class ToyFlowSampler(SamplerSettings):
    steps: int = Field(20, ge=1, le=1000, description="Euler steps from t = 0 (noise) to t = 1 (data).")
    temperature: float = Field(1.0, gt=0, description="τ: scale of the initial noise; < 1 mode-seeking, > 1 diversity-seeking.")


@register_family
class ToyFlowFamily(_ToyFamily):
    name = "toy-flow"
    sampler_schema = ToyFlowSampler
    time_scale = 1000.0  # t ∈ [0, 1] → the same embedding range as DDPM timesteps

    def training_loss(self, net, images, labels, generator):
        x = images.float()  # (B, D) raw coordinates
        b, dev = x.shape[0], x.device
        t = torch.rand(b, generator=generator).to(dev)
        z = torch.randn(x.shape, generator=generator).to(dev)
        x_t = (1 - t[:, None]) * z + t[:, None] * x  # linear interpolant
        return F.mse_loss(net(x_t, t).float(), x - z)  # target velocity dx_t/dt

    @torch.no_grad()
    def sample(self, net, labels, seeds, settings):
        s = self.validate_sampler(settings)
        dev = labels.device
        x = s.temperature * self._noise(seeds, 1, dev)[:, 0]  # (B, D)
        dt = 1.0 / s.steps
        for i in range(s.steps):
            t = torch.full((x.shape[0],), i * dt, device=dev)
            x = x + dt * net(x, t).float()
        return x
