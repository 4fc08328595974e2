"""Few-step generator: consistency training from scratch (no teacher), sampled in 1, 2, 4 or 8 steps.

Objective: improved consistency training (iCT; Song & Dhariwal 2024, "Improved Techniques for
Training Consistency Models", building on Song et al. 2023, "Consistency Models"):
- f(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), y), with the boundary condition
  f(x, σ_min) = x built in (CM Sec. 3 and App. C; EDM preconditioning, σ_data = 0.5);
- discretised Karras σ schedule (EDM Eq. 5, ρ = 7) whose number of levels N(k) doubles from s0 to s1
  over training (iCT Sec. 3.4, exponential curriculum);
- noise level i drawn from the discretised log-normal (iCT Sec. 3.5: P_mean = −1.1, P_std = 2);
- loss λ(σ_i)·d(f_θ(x + σ_{i+1}z, σ_{i+1}), sg[f_θ(x + σ_i z, σ_i)]) with λ = 1/(σ_{i+1} − σ_i) and the
  pseudo-Huber distance d(a, b) = √(‖a − b‖² + c²) − c, c = 0.00054·√dim (iCT Sec. 3.1, 3.3);
- the teacher is the stop-gradient of the student itself (iCT Sec. 3.2, no EMA teacher).

The curriculum step k is a counter buffer in the network (`ct_step`, int64): `training_loss` reads
it and adds 1, so it survives progress checkpoints, and the EMA copy and the merge carry it over
unchanged (integer buffers are copied from θ_base). A fine-tune thus continues at the base's final N.
Set `levels_start == levels_end` for a fixed number of levels.

Sampling: multistep consistency sampling (CM Algorithm 1) at σ_max followed by the first `steps − 1`
inner levels of a (steps + 1)-level Karras grid. CFG: trained with label dropout 0.1; at sampling the
denoised outputs are extrapolated, f = f_u + γ(f_c − f_u), as IMM does (Zhou et al. 2025) — a
heuristic for consistency functions, with conditional and unconditional rows in one forward.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .base import ModelFamily, SamplerSettings
from .guidance import classifier_free_guidance, tile
from .registry import register_family
from .unet import UNet


class FewStepSampler(SamplerSettings):
    steps: Literal[1, 2, 4, 8] = Field(1, description="Consistency sampling steps: 1, 2, 4 or 8.")
    guidance: float = Field(1.0, ge=0, description="CFG scale γ on the denoised output: f = f_u + γ(f_c − f_u); 1 = conditional only.")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n noise levels σ_min … σ_max, ascending (EDM Eq. 5 read backwards). float64 (n,)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


class ConsistencyUNet(nn.Module):
    """f(x, σ, y): the U-Net under EDM preconditioning with the consistency boundary condition."""

    def __init__(self, unet: UNet, sigma_min: float, sigma_data: float):
        super().__init__()
        self.unet = unet
        self.sigma_min, self.sigma_data = sigma_min, sigma_data
        self.register_buffer("ct_step", torch.zeros((), dtype=torch.int64))  # training steps taken (curriculum)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = sigma.float()[:, None, None, None]  # (B, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd**2 / ((s - self.sigma_min) ** 2 + sd**2)  # CM App. C: 1 at σ_min
        c_out = (s - self.sigma_min) * sd / (s**2 + sd**2).sqrt()  # 0 at σ_min
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = 250.0 * sigma.float().log()  # 1000 · ln(σ)/4, the CM code's time input
        return c_skip * x.float() + c_out * self.unet(c_in * x.float(), c_noise, y).float()


@register_family
class FewStepFamily(ModelFamily):
    name = "fewstep"
    # U-Net sizes as the diffusion family's unet-tiny / unet-p2s; iCT constants from the paper unless noted.
    _ct = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, p_mean=-1.1, p_std=2.0, levels_start=10, levels_end=1280)
    presets = {
        "fewstep-tiny": dict(channels=(16, 32, 32), blocks_per_level=1, attention_levels=(), dropout=0.0, patch=1, **_ct,
                             levels_double_every=10),
        # Sized for neon_ray/configs/fmnist_fewstep.yaml's 2,000 steps: N doubles every 250 and reaches 1280 at step 1,750
        # (iCT: K' = K / (log2(s1/s0) + 1)). 1,400 steps × 64 (12 min on this CPU) gave recognisable 1–2-step samples.
        "fewstep-fmnist": dict(channels=(48, 96), blocks_per_level=1, attention_levels=(1,), dropout=0.0, patch=2, **_ct,
                               levels_double_every=250),
    }
    sampler_schema = FewStepSampler
    label_dropout = 0.1  # p(null class) in training, for CFG

    def build(self) -> nn.Module:
        h = self.hparams
        c, _, _ = self.spec.image_shape
        unet = UNet(in_channels=c, num_classes=self.spec.num_classes, channels=tuple(h["channels"]), blocks_per_level=h["blocks_per_level"],
                    attention_levels=tuple(h["attention_levels"]), dropout=h["dropout"], patch=h.get("patch", 1))
        return ConsistencyUNet(unet, float(h["sigma_min"]), float(h["sigma_data"]))

    # -- training --------------------------------------------------------------------------------
    def num_levels(self, step: int) -> int:
        """N(k) = min(s0 · 2^⌊k / K'⌋, s1) + 1 (iCT Sec. 3.4), K' = `levels_double_every`."""
        h = self.hparams
        doublings = min(step // max(1, int(h["levels_double_every"])), 32)
        return min(int(h["levels_start"]) * 2**doublings, int(h["levels_end"])) + 1

    def level_probs(self, sigmas: torch.Tensor) -> torch.Tensor:
        """p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std)), i < N − 1 (iCT Sec. 3.5)."""
        h = self.hparams
        cdf = torch.erf((sigmas.log() - h["p_mean"]) / (math.sqrt(2) * h["p_std"]))
        p = (cdf[1:] - cdf[:-1]).clamp(min=0)
        return p / p.sum()

    def training_loss(self, net, images, labels, generator):
        h = self.hparams
        core = getattr(net, "module", net)  # DDP/DeepSpeed wrappers keep the network in .module
        step = int(core.ct_step)
        core.ct_step.add_(1)
        b, dev = images.shape[0], images.device
        sigmas = karras_sigmas(self.num_levels(step), h["sigma_min"], h["sigma_max"], h["rho"])  # (N,) ascending
        i = torch.multinomial(self.level_probs(sigmas), b, replacement=True, generator=generator)  # (B,)
        z = torch.randn(images.shape, generator=generator).to(dev)
        drop = torch.rand(b, generator=generator).to(dev) < self.label_dropout
        y = torch.where(drop, torch.full_like(labels, self.spec.num_classes), labels)
        s_lo, s_hi = sigmas[i].float().to(dev), sigmas[i + 1].float().to(dev)  # σ_i < σ_{i+1}, (B,)
        x = images.float()
        student = net(x + s_hi[:, None, None, None] * z, s_hi, y)
        with torch.no_grad():
            teacher = net(x + s_lo[:, None, None, None] * z, s_lo, y).float()  # sg[f_θ], same z (iCT Sec. 3.2)
        dim = x[0].numel()
        c = 0.00054 * math.sqrt(dim)
        dist = ((student.float() - teacher) ** 2).flatten(1).sum(1).add(c**2).sqrt() - c  # pseudo-Huber, (B,)
        return (dist / (s_hi - s_lo)).mean()  # λ(σ_i) = 1/(σ_{i+1} − σ_i)

    # -- sampling --------------------------------------------------------------------------------
    def sampling_sigmas(self, steps: int) -> list[float]:
        """σ_max, then the next steps − 1 levels of a (steps + 1)-level Karras grid, descending."""
        h = self.hparams
        grid = karras_sigmas(steps + 1, h["sigma_min"], h["sigma_max"], h["rho"]).flip(0)
        return grid[:steps].tolist()

    def _denoise(self, net, x, sigma, labels, guidance):
        sig = torch.full((x.shape[0],), sigma, device=x.device)
        return classifier_free_guidance(lambda y, k: net(tile(x, k), tile(sig, k), y).float(), labels,
                                        self.spec.num_classes, guidance)[0]

    @torch.no_grad()
    def sample(self, net, labels, seeds, settings):
        s = self.validate_sampler(settings)
        h = self.hparams
        dev, shape = labels.device, self.spec.image_shape
        gens = self.sample_generators(seeds)

        def noise() -> torch.Tensor:
            return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)  # (B, C, H, W)

        # Multistep consistency sampling (CM Algorithm 1).
        sigmas = self.sampling_sigmas(s.steps)
        x0 = self._denoise(net, sigmas[0] * noise(), sigmas[0], labels, s.guidance)
        for sigma in sigmas[1:]:
            x_t = x0 + math.sqrt(sigma**2 - h["sigma_min"] ** 2) * noise()
            x0 = self._denoise(net, x_t, sigma, labels, s.guidance)
        return x0.clamp(-1, 1)
