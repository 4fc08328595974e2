"""Flow matching with velocity prediction, in the SiT convention (Ma et al. 2024, willisma/SiT).

Linear interpolant, t = 0 noise → t = 1 data: x_t = t·x + (1 − t)·ε, target velocity u = x − ε,
loss ‖v_θ(x_t, t, y) − u‖² with t ~ U[0, 1] (rectified flow / flow matching). The network sees t in
[0, 1] as SiT does, so SiT checkpoints (DiT keys; learn_sigma channels ignored) load into DiT-* presets.
Sampling integrates dx/dt = v from t = 0 to 1: fixed-step Euler or Heun, or an adaptive
Dormand–Prince 5(4) pair with per-sample step-size control (each sample its own t and h), so sample i
depends on seeds[i] only — never on a batch-wide error norm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..errors import NeonError
from .backbones import DenoiserFamily, DenoiserSampler, presets_for
from .registry import register_family


class FlowSampler(DenoiserSampler):
    name: Literal["euler", "heun", "adaptive"] = Field("adaptive", description="euler (NFE = steps), heun (NFE = 2·steps) or adaptive (Dormand–Prince 5(4), as SiT's dopri5).")
    steps: int = Field(50, ge=1, le=10_000, description="Steps of the fixed-step solvers (ignored by adaptive).")
    rtol: float = Field(1e-3, gt=0, lt=1, description="adaptive: relative tolerance (SiT default 1e-3).")
    atol: float = Field(1e-6, gt=0, description="adaptive: absolute tolerance (SiT default 1e-6).")
    max_steps: int = Field(2000, ge=1, description="adaptive: most attempted steps per sample before giving up.")


# Dormand & Prince (1980) 5(4) tableau: nodes c, stage matrix A, 5th-order weights B5 (= the last row of
# A: first-same-as-last) and the 4th-order embedded weights B4 used only for the error estimate.
DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # v(x (b, ...), t (b,), rows (b,))


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square over all but the batch dimension: (B,)."""
    return x.pow(2).flatten(1).mean(1).sqrt()


def dopri5(v: Velocity, x0: torch.Tensor, rtol: float, atol: float, max_steps: int) -> tuple[torch.Tensor, int]:
    """Integrate dx/dt = v(x, t) from t = 0 to 1 for each sample on its own adaptive grid.

    Every sample keeps its own (t, h); a step is accepted or rejected per sample by its own error
    norm (Hairer, Nørsett & Wanner, Solving ODEs I, §II.4), and only unfinished samples are evaluated.
    Returns (x at t = 1, network evaluations in rows).
    """
    b = x0.shape[0]
    x = x0.clone()
    t = torch.zeros(b, dtype=torch.float64, device=x0.device)
    every = torch.arange(b, device=x0.device)
    k1 = v(x, t, every)
    h = _initial_step(v, x, k1, rtol, atol)  # (B,) float64
    nfe, attempts = 2 * b, torch.zeros(b, dtype=torch.long, device=x0.device)
    done = torch.zeros(b, dtype=torch.bool, device=x0.device)
    while not bool(done.all()):
        rows = (~done).nonzero().squeeze(1)
        xa, ta, k1a = x[rows], t[rows], k1[rows]
        ha = torch.minimum(h[rows], 1.0 - ta)  # (b,) never step past t = 1
        hx = _per_sample(ha, xa).to(xa.dtype)
        ks = [k1a]
        for i in range(1, 7):
            xi = xa + hx * sum(a * k for a, k in zip(DP_A[i], ks) if a)
            ks.append(v(xi, ta + DP_C[i] * ha, rows))
        nfe += 6 * len(rows)
        x5 = xi  # the 7th stage is evaluated at the 5th-order solution (FSAL)
        err = hx * sum((b5 - b4) * k for b5, b4, k in zip(DP_B5, DP_B4, ks) if b5 != b4)
        ratio = _rms(err / (atol + rtol * torch.maximum(xa.abs(), x5.abs()))).double()  # (b,)
        ok = ratio <= 1.0
        last = ok & (ha >= 1.0 - ta)
        x[rows[ok]] = x5[ok]
        k1[rows[ok]] = ks[6][ok]
        t[rows[ok]] = torch.where(last[ok], torch.ones_like(ta[ok]), ta[ok] + ha[ok])
        done[rows[last]] = True
        # Step-size controller: h ← h·clamp(0.9·ratio^(−1/5), 0.2, 10) (safety 0.9, order 5).
        factor = (0.9 * ratio.clamp(min=1e-10) ** -0.2).clamp(0.2, 10.0)
        h[rows] = ha * factor
        attempts[rows] += 1
        if bool((attempts > max_steps).any()):
            raise NeonError(f"sampler.max_steps: the adaptive solver needed more than {max_steps} steps for a sample; loosen sampler.rtol/atol or raise sampler.max_steps")
    return x, nfe


def _initial_step(v: Velocity, x: torch.Tensor, f0: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """Per-sample starting step (Hairer et al., Solving ODEs I, §II.4, 'starting step size'): (B,) float64."""
    b = x.shape[0]
    scale = atol + rtol * x.abs()
    d0, d1 = _rms(x / scale).double(), _rms(f0 / scale).double()
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    x1 = x + _per_sample(h0, x).to(x.dtype) * f0
    f1 = v(x1, h0, torch.arange(b, device=x.device))
    d2 = _rms((f1 - f0) / scale).double() / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3), (0.01 / dmax.clamp(min=1e-15)) ** 0.2)
    return torch.minimum(100 * h0, h1).clamp(max=1.0)


@register_family
class FlowFamily(DenoiserFamily):
    name = "flow"
    # SiT reuses the DiT sizes; its released checkpoints keep learn_sigma (channels ignored), so DiT-* do too.
    presets = presets_for(unet_defaults={}, dit_defaults=dict(learn_sigma=False), official_dit_defaults=dict(learn_sigma=True))
    sampler_schema = FlowSampler

    def training_loss(self, net, images, labels, generator):
        b, dev = images.shape[0], images.device
        t = torch.rand(b, generator=generator).to(dev)  # t ~ U[0, 1]
        noise = torch.randn((b, *self.data_shape), generator=generator).to(dev)
        y = self.drop_labels(labels, generator)
        x1 = self.to_data(images, generator).float()
        tt = t[:, None, None, None]
        x_t = tt * x1 + (1 - tt) * noise  # the linear path, t = 1 at the data (SiT)
        c = self.data_shape[0]
        return F.mse_loss(net(x_t, t, y).float()[:, :c], x1 - noise)  # velocity target u = x − ε

    @torch.no_grad()
    def sample(self, net, labels, seeds, settings):
        s, net, gens = self.start_sampling(net, settings, seeds)
        x = self.noise_like_data(gens, labels.device)  # x at t = 0 (noise)

        def velocity(x_: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return self.guided(net, x_, t.float(), labels[rows], s.guidance)[0]

        if s.name == "adaptive":
            x, _ = dopri5(velocity, x, s.rtol, s.atol, s.max_steps)
        else:
            x = self._fixed_steps(velocity, x, s.steps, heun=s.name == "heun")
        return self.to_images(x)

    @staticmethod
    def _fixed_steps(v: Velocity, x: torch.Tensor, steps: int, heun: bool) -> torch.Tensor:
        """Euler or Heun (explicit trapezoid) on the uniform grid 0 = t_0 < … < t_N = 1."""
        b = x.shape[0]
        rows = torch.arange(b, device=x.device)
        grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
        for t0, t1 in zip(grid[:-1], grid[1:]):
            h = t1 - t0
            d = v(x, torch.full((b,), t0, device=x.device), rows)
            x_next = x + h * d
            if heun:
                x_next = x + h * 0.5 * (d + v(x_next, torch.full((b,), t1, device=x.device), rows))
            x = x_next
        return x
