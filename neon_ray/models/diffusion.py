"""VP diffusion with ε-prediction (DDPM): cosine or linear schedule, DDIM/ancestral samplers, CFG, learned variances.

Backbone by preset: the U-Net (`unet-*`) or DiT (`dit-*`, `DiT-*`). The official DiT sizes default to
the official DiT recipe (linear β 1e-4 → 0.02 over 1000 steps, learn_sigma), so a released DiT
checkpoint fine-tunes with its original objective: MSE on ε plus the Improved-DDPM VLB term that
trains the variance interpolant with a stop-gradient on the mean (Nichol & Dhariwal 2021, §3.1, λ = 1).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..errors import ConfigError
from .backbones import DenoiserFamily, DenoiserSampler, presets_for
from .registry import register_family


class DiffusionSampler(DenoiserSampler):
    name: Literal["ddim", "ancestral"] = Field("ddim", description="ddim (η configurable) or ancestral (DDPM; with learn_sigma it uses the learned variances, as DiT samples).")
    steps: int = Field(20, ge=1, le=1000, description="Denoising steps (timesteps respaced evenly over the 1000).")
    eta: float = Field(0.0, ge=0, le=1, description="DDIM stochasticity (0 = deterministic).")
    clip_denoised: bool = Field(True, description="Clip the predicted x₀ to [-1, 1] at every step (pixel space only; latents are never clipped).")


# -- noise schedules -----------------------------------------------------------------------------


def cosine_alpha_bar(num_steps: int, s: float = 0.008) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1 (Nichol & Dhariwal 2021, Eq. 17), β clipped at 0.999."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


def linear_alpha_bar(num_steps: int) -> torch.Tensor:
    """ᾱ_t for DDPM's linear β_t from 1e-4 to 0.02 (Ho et al. 2020, §4), scaled to T steps as in IDDPM/DiT."""
    scale = 1000 / num_steps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


SCHEDULES = {"cosine": cosine_alpha_bar, "linear": linear_alpha_bar}


class VPSchedule:
    """A discrete VP chain given ᾱ (float64) and its posterior q(x_{t−1} | x_t, x₀) (DDPM Eq. 6–7)."""

    def __init__(self, alpha_bar: torch.Tensor):
        ab = alpha_bar.double()
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        self.alpha_bar = ab
        self.betas = 1 - ab / ab_prev
        self.posterior_var = self.betas * (1 - ab_prev) / (1 - ab)
        # log σ̃² with the t = 0 entry (σ̃₀² = 0) replaced by σ̃₁², as IDDPM clips it.
        self.posterior_logvar = torch.cat([self.posterior_var[1:2], self.posterior_var[1:]]).log() if len(ab) > 1 else self.posterior_var.log()
        self.coef_x0 = self.betas * ab_prev.sqrt() / (1 - ab)
        self.coef_xt = (1 - ab_prev) * (1 - self.betas).sqrt() / (1 - ab)

    def respaced(self, kept: list[int]) -> "VPSchedule":
        """The chain over the kept timesteps (ascending): β'_j = 1 − ᾱ_{t_j}/ᾱ_{t_{j−1}} (IDDPM §4, DiT's respacing)."""
        return VPSchedule(self.alpha_bar[kept])

    @staticmethod
    def at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """table[t] as float32 shaped (B, 1, 1, 1) for broadcasting over images."""
        return table.to(t.device)[t].float()[:, None, None, None]


# -- the learned-variance VLB term (IDDPM) -------------------------------------------------------


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) for 8-bit data in [-1, 1]: the Gaussian's mass over x's bin of width 2/255 (DDPM §3.3, Eq. 13)."""
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()  # the lowest bin reaches −∞
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()  # the highest reaches +∞
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def learned_logvar(v: torch.Tensor, sched: VPSchedule, t: torch.Tensor) -> torch.Tensor:
    """log Σ_θ = frac·log β_t + (1 − frac)·log σ̃²_t with frac = (v + 1)/2 (IDDPM Eq. 15)."""
    frac = (v + 1) / 2
    return frac * VPSchedule.at(sched.betas.log(), t) + (1 - frac) * VPSchedule.at(sched.posterior_logvar, t)


def vlb_bits(sched: VPSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """L_vlb per sample in bits/dim (IDDPM Eq. 4–6): KL to the true posterior, or the decoder NLL at t = 0.

    `eps` should be detached by the caller: the VLB trains only the variance (L_hybrid, IDDPM §3.1).
    """
    ab = VPSchedule.at(sched.alpha_bar, t)
    x0_pred = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
    coef_x0, coef_xt = VPSchedule.at(sched.coef_x0, t), VPSchedule.at(sched.coef_xt, t)
    mean_pred, mean_true = coef_x0 * x0_pred + coef_xt * x_t, coef_x0 * x0 + coef_xt * x_t
    logvar = learned_logvar(v, sched, t)
    kl = normal_kl(mean_true, VPSchedule.at(sched.posterior_logvar, t), mean_pred, logvar).mean(dim=(1, 2, 3))
    nll = -discretized_gaussian_log_likelihood(x0, mean_pred, 0.5 * logvar).mean(dim=(1, 2, 3))
    return torch.where(t == 0, nll, kl) / math.log(2.0)  # (B,)


# -- the family ---------------------------------------------------------------------------------


@register_family
class DiffusionFamily(DenoiserFamily):
    name = "diffusion"
    # Backbone sizes: backbones.UNET_PRESETS and dit.DIT_PRESETS. FID notes live in neon_ray/configs/*.yaml
    # beside the runs that measured them. DiT-* follow the official DiT recipe so released weights load.
    presets = presets_for(
        unet_defaults=dict(schedule="cosine"),
        dit_defaults=dict(schedule="cosine", learn_sigma=False),
        official_dit_defaults=dict(schedule="linear", learn_sigma=True),
    )
    family_fields = {"schedule"}
    sampler_schema = DiffusionSampler
    num_timesteps = 1000

    def __init__(self, spec):
        super().__init__(spec)
        if self.hparams["schedule"] not in SCHEDULES:
            raise ConfigError(f"model.options.schedule: unknown schedule {self.hparams['schedule']!r}; choose one of {sorted(SCHEDULES)}")
        self.schedule = VPSchedule(SCHEDULES[self.hparams["schedule"]](self.num_timesteps))
        self.alpha_bar = self.schedule.alpha_bar  # float64 (T,)

    def training_loss(self, net, images, labels, generator):
        b, dev = images.shape[0], images.device
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator).to(dev)
        noise = torch.randn((b, *self.data_shape), generator=generator).to(dev, images.dtype)
        y = self.drop_labels(labels, generator)
        x0 = self.to_data(images, generator)
        ab = self.alpha_bar.to(dev)[t].float()[:, None, None, None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise  # q(x_t | x_0), DDPM Eq. 4
        out = net(x_t, t, y).float()
        c = self.data_shape[0]
        loss = F.mse_loss(out[:, :c], noise.float())  # L_simple (DDPM Eq. 14)
        if self.learn_sigma:  # + L_vlb for the variances, mean frozen (IDDPM L_hybrid, λ = 1 as in DiT)
            loss = loss + vlb_bits(self.schedule, x0.float(), x_t.float(), t, out[:, :c].detach(), out[:, c:]).mean()
        return loss

    @torch.no_grad()
    def sample(self, net, labels, seeds, settings):
        s, net, gens = self.start_sampling(net, settings, seeds)
        dev = labels.device
        x = self.noise_like_data(gens, dev)  # (B, C, H, W), x_T
        ts = torch.linspace(self.num_timesteps - 1, 0, s.steps).round().long().tolist()
        learned = s.name == "ancestral" and self.learn_sigma
        respaced = self.schedule.respaced(ts[::-1]) if learned else None
        clip = s.clip_denoised and self.latent is None
        for i, t in enumerate(ts):
            tt = torch.full((x.shape[0],), t, device=dev, dtype=torch.long)
            eps, v = self.guided(net, x, tt, labels, s.guidance)
            if learned:
                x = self._ancestral_learned_step(respaced, len(ts) - 1 - i, x, eps, v, clip, gens)
            else:
                x = self._ddim_step(t, ts[i + 1] if i + 1 < len(ts) else None, x, eps, 1.0 if s.name == "ancestral" else s.eta, clip, gens)
        return self.to_images(x)

    def _ddim_step(self, t: int, t_prev: int | None, x, eps, eta: float, clip: bool, gens):
        """DDIM update (Song et al. 2021, Eq. 12) with σ from Eq. 16; η = 1 is DDPM's ancestral step."""
        ab = self.alpha_bar
        ab_t = float(ab[t])
        ab_prev = float(ab[t_prev]) if t_prev is not None else 1.0
        x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) if ab_prev < 1 else 0.0
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * self.noise_like_data(gens, x.device)
        return x

    def _ancestral_learned_step(self, sched: VPSchedule, j: int, x, eps, v, clip: bool, gens):
        """x_{j−1} ~ N(μ̃(x̂₀, x_j), Σ_θ) on the respaced chain, Σ_θ from the variance channels (IDDPM Eq. 15)."""
        jj = torch.full((x.shape[0],), j, device=x.device, dtype=torch.long)
        ab = VPSchedule.at(sched.alpha_bar, jj)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = VPSchedule.at(sched.coef_x0, jj) * x0 + VPSchedule.at(sched.coef_xt, jj) * x
        if j == 0:  # the last step returns the mean
            return mean
        return mean + torch.exp(0.5 * learned_logvar(v, sched, jj)) * self.noise_like_data(gens, x.device)
