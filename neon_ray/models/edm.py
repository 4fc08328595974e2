"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Denoiser D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)) with the preconditioning of
Table 1 (σ_data = 0.5); loss λ(σ)·‖D(y + n; σ) − y‖² with ln σ ~ N(P_mean, P_std²) (§5, Eq. 8);
deterministic Heun (Algorithm 1) or Euler sampling on the ρ-schedule (Eq. 5). CFG combines the
conditional and unconditional passes of one batched forward (trained with 10% null labels).
Backbone: any U-Net or DiT preset, in pixel space or VAE latents.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from .backbones import DenoiserFamily, DenoiserSampler, presets_for
from .registry import register_family


class EDMSampler(DenoiserSampler):
    name: Literal["heun", "euler"] = Field("heun", description="heun: 2nd order, NFE = 2·steps − 1 (EDM Algorithm 1); euler: NFE = steps.")
    steps: int = Field(18, ge=1, le=1000, description="Number of σ levels N before σ = 0 (EDM uses 18 on CIFAR-10, 40 on FFHQ/AFHQ).")
    sigma_min: float = Field(0.002, gt=0, description="Smallest σ of the schedule.")
    sigma_max: float = Field(80.0, gt=0, description="Largest σ, the initial noise level.")
    rho: float = Field(7.0, gt=0, description="Schedule curvature ρ (EDM Eq. 5).")

    @field_validator("sigma_max")
    @classmethod
    def _above_min(cls, v: float, info: ValidationInfo) -> float:
        lo = info.data.get("sigma_min")
        if lo is not None and v <= lo:
            raise ValueError(f"must be greater than sampler.sigma_min ({lo})")
        return v


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i < N, then σ_N = 0 (EDM Eq. 5): (N + 1,) float64."""
    i = torch.arange(steps, dtype=torch.float64)
    frac = i / max(steps - 1, 1)
    sigmas = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# EDM §5 / Table 1: σ_data = 0.5 (data in [-1, 1]); training draws ln σ ~ N(P_mean = −1.2, P_std² = 1.2²).
EDM_DEFAULTS = dict(sigma_data=0.5, p_mean=-1.2, p_std=1.2)


@register_family
class EDMFamily(DenoiserFamily):
    name = "edm"
    presets = presets_for(unet_defaults=EDM_DEFAULTS, dit_defaults=dict(EDM_DEFAULTS, learn_sigma=False),
                          official_dit_defaults=dict(EDM_DEFAULTS, learn_sigma=False))
    family_fields = set(EDM_DEFAULTS)
    sampler_schema = EDMSampler

    def __init__(self, spec):
        super().__init__(spec)
        h = self.hparams
        self.sigma_data, self.p_mean, self.p_std = float(h["sigma_data"]), float(h["p_mean"]), float(h["p_std"])

    def denoise(self, net, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
        """D(x; σ) with the Table 1 preconditioning. x: (B, C, H, W); sigma: (B,) float."""
        sd2 = self.sigma_data**2
        s = sigma.float()[:, None, None, None]  # (B, 1, 1, 1)
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1 / (s**2 + sd2).sqrt()
        c_noise = sigma.float().log() / 4  # (B,)
        f, _ = self.guided(net, c_in * x, c_noise, labels, guidance)  # CFG on F is CFG on D: D is affine in F
        return c_skip * x + c_out * f

    def training_loss(self, net, images, labels, generator):
        b, dev = images.shape[0], images.device
        sigma = (torch.randn(b, generator=generator) * self.p_std + self.p_mean).exp().to(dev)  # ln σ ~ N(P_mean, P_std²)
        noise = torch.randn((b, *self.data_shape), generator=generator).to(dev)
        y = self.drop_labels(labels, generator)
        x0 = self.to_data(images, generator).float()
        d = self.denoise(net, x0 + sigma[:, None, None, None] * noise, sigma, y)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2  # λ(σ), EDM Table 1
        # EDM sums over pixels; the mean differs by a constant factor (C·H·W) and keeps lr/grad-clip scales familiar.
        return (weight[:, None, None, None] * (d - x0) ** 2).mean()

    @torch.no_grad()
    def sample(self, net, labels, seeds, settings):
        s, net, gens = self.start_sampling(net, settings, seeds)
        dev = labels.device
        sigmas = karras_sigmas(s.steps, s.sigma_min, s.sigma_max, s.rho).tolist()
        x = self.noise_like_data(gens, dev) * sigmas[0]  # x_0 ~ N(0, σ_max² I)
        b = x.shape[0]

        def slope(x_: torch.Tensor, sigma: float) -> torch.Tensor:  # dx/dσ = (x − D(x; σ))/σ (EDM Eq. 3, σ(t) = t)
            return (x_ - self.denoise(net, x_, torch.full((b,), sigma, device=dev), labels, s.guidance)) / sigma

        for cur, nxt in zip(sigmas[:-1], sigmas[1:]):
            d = slope(x, cur)
            x_next = x + (nxt - cur) * d  # Euler step
            if s.name == "heun" and nxt > 0:  # 2nd-order correction, skipped into σ = 0 (Algorithm 1, l. 7)
                x_next = x + (nxt - cur) * 0.5 * (d + slope(x_next, nxt))
            x = x_next
        return self.to_images(x)
