"""Predicting a helpful w before any image is sampled from θ(w): the real-data gradient against Δ, and the
real-data objective along the Neon line (the math of the `diagnose` stage; pure torch, no Ray, DeepSpeed or MLflow).

Why it predicts (paper, "why it works"): a short fine-tune moves θ by Δ = θ_ft − θ_base ≈ −α·P·g_s (P the
optimizer's preconditioner, g_s the gradient on S). Along the merge line θ(w) = θ_base − w·Δ the real-data risk is

    L(θ(w)) = L(θ_base) − w·⟨g, Δ⟩ + O(w²),      g = ∇L_real(θ_base),

so it falls for small w > 0 exactly when ⟨g, Δ⟩ > 0, i.e. when g and the self-training direction P·g_s ≈ −Δ/α are
anti-aligned. `cosine` follows the paper's convention (App. B): the cosine between g and −Δ (≈ P·g_s up to α),
which the paper reports negative for a mode-seeking S (Neon helps, w > 0) and positive for a diversity-seeking one.
The training loss is a proxy for what FID measures: on the toy the prediction holds for the diversity-seeking
sampler and fails for the mode-seeking one (docs/results.md).

Common random numbers: batch b of the held-out real data gets the same noise, timesteps, label drops and tokens
for every θ (a generator seeded by the batch's own seed, keyed by the caller as (seed, "diagnose", b), handed to
the family's own `training_loss`), so differences between θs are not sampling noise; the standard errors are over
batches (paired for the line).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .merge import neon_tensor


@dataclass
class Diagnosis:
    sign: int  # +1: w > 0 helps, −1: w < 0 helps, 0: abstain (|g·Δ| within two standard errors of zero)
    bracket: list[float]  # [w_lo, w_hi] for the search
    bracket_open: bool  # the loss was still falling at the last w on the predicted side: the minimum may lie beyond
    cosine: float  # cos(g, −Δ): the paper's gradient cosine, negative = anti-aligned = w > 0 helps
    g_dot_delta: float  # ⟨g, Δ⟩ = −dL(θ(w))/dw at w = 0
    g_dot_delta_se: float  # its standard error over batches
    grad_norm: float
    delta_norm: float
    loss_argmin_w: float  # the w point with the lowest real-data loss
    losses: list[dict]  # per w point: {"w", "loss", "diff", "diff_se"} (diff = L(w) − L(0), paired over batches)
    batches: int
    images: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def batch_generator(seed: int) -> torch.Generator:
    """A held-out batch's generator: the same draws for every θ (common random numbers)."""
    return torch.Generator().manual_seed(int(seed))


def delta_of(base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Δ = θ_ft − θ_base in fp32 over the tensors the merge extrapolates (finite floating-point tensors of θ_base)."""
    out = {}
    for name, b in base.items():
        if b.is_floating_point() and torch.isfinite(b).all():
            out[name] = finetuned[name].float() - b.float()
    return out


def line_state(base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], w: float) -> dict[str, torch.Tensor]:
    """θ(w) = θ_base − w·Δ exactly as `neon-ray merge` writes it (neon_ray.merge.neon_tensor, tensor by tensor)."""
    return {name: neon_tensor(b, finetuned[name], w) for name, b in base.items()}


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def diagnose(loss_fn: LossFn, net: nn.Module, base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
             batches: Sequence[tuple[torch.Tensor, torch.Tensor]], seeds: Sequence[int], w_points: Sequence[float]) -> Diagnosis:
    """The diagnosis of Δ on held-out real batches [(x (B, ...), y (B,))], batch b drawn with `seeds[b]`: `net` holds
    θ_base's architecture (its weights are replaced and left at θ_base), `loss_fn` is the family's `training_loss`."""
    t0 = time.time()
    share = measure(loss_fn, net, base, finetuned, batches, seeds, w_points)
    return conclude([share], w_points, time.time() - t0)


@dataclass
class Share:
    """What one process measured on its share of the batches (in batch order); `conclude` joins shares."""

    dots: list[float]  # ⟨g_b, Δ⟩ per batch
    line: dict[float, list[float]]  # w → L_b(θ(w)) per batch (w = 0 included)
    g_sum: dict[str, torch.Tensor]  # Σ_b g_b over the share (fp32)
    delta_sq: float  # |Δ|² over the parameters
    images: int
    g_sum_sq: float | None = None  # |Σ_b g_b|² instead of g_sum, from a share of all batches whose sum is sharded over ranks (ZeRO)


def measure(loss_fn: LossFn, net: nn.Module, base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
            batches: Sequence[tuple[torch.Tensor, torch.Tensor]], seeds: Sequence[int], w_points: Sequence[float]) -> Share:
    """The gradient pass at θ_base and the loss along the line on some batches (a worker's share, or all of them)."""
    assert len(seeds) == len(batches), "one seed per batch"
    net.eval()  # the objective without dropout: a deterministic function of θ and the batch's generator
    net.load_state_dict(base, strict=True)
    delta = delta_of(base, finetuned)
    params = {name: p for name, p in net.named_parameters() if name in delta}

    # 1. The real-data gradient at θ_base, batch by batch: ⟨g_b, Δ⟩ per batch and Σ_b g_b (for ḡ).
    g_sum = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    dots, base_losses = [], []
    for (x, y), seed in zip(batches, seeds):
        net.zero_grad(set_to_none=True)
        loss = loss_fn(net, x, y, batch_generator(seed))
        loss.backward()
        dot = 0.0
        for name, p in params.items():
            if p.grad is not None:
                g = p.grad.detach().float()
                dot += float((g * delta[name]).sum(dtype=torch.float64))
                g_sum[name] += g
        dots.append(dot)
        base_losses.append(float(loss.detach()))
    net.zero_grad(set_to_none=True)

    # 2. The real-data objective along the line θ(w) = θ_base − w·Δ, on the same batches and draws.
    line = {0.0: base_losses}
    with torch.no_grad():
        for w in sorted({float(w) for w in w_points} - {0.0}):
            net.load_state_dict(line_state(base, finetuned, w), strict=True)
            line[w] = [float(loss_fn(net, x, y, batch_generator(seed))) for (x, y), seed in zip(batches, seeds)]
    net.load_state_dict(base, strict=True)
    delta_sq = sum(float(d.double().pow(2).sum()) for name, d in delta.items() if name in params)
    return Share(dots=dots, line=line, g_sum=g_sum, delta_sq=delta_sq, images=sum(int(x.shape[0]) for x, _ in batches))


def conclude(shares: Sequence[Share], w_points: Sequence[float], seconds: float) -> Diagnosis:
    """The diagnosis from the shares of all the batches (in batch order): statistics over batches, the sign, the bracket."""
    dots = [d for s in shares for d in s.dots]
    n = len(dots)
    assert n >= 2, "the standard errors need two batches at least"
    g_dot, g_se = _mean(dots), _se(dots)
    if len(shares) == 1 and shares[0].g_sum_sq is not None:
        grad_norm = math.sqrt(shares[0].g_sum_sq) / n
    else:
        g_sum = {name: sum(s.g_sum[name] for s in shares) for name in shares[0].g_sum}
        grad_norm = math.sqrt(sum(float((g / n).double().pow(2).sum()) for g in g_sum.values()))
    delta_norm = math.sqrt(shares[0].delta_sq)
    cosine = -g_dot / (grad_norm * delta_norm) if grad_norm > 0 and delta_norm > 0 else 0.0

    ws = sorted({float(w) for w in w_points} | {0.0})
    base_losses = [v for s in shares for v in s.line[0.0]]
    losses = []
    for w in ws:
        per_batch = [v for s in shares for v in s.line[w]]
        diffs = [a - c for a, c in zip(per_batch, base_losses)]  # paired: the same batch and draws at w and at 0
        losses.append({"w": w, "loss": _mean(per_batch), "diff": _mean(diffs), "diff_se": _se(diffs)})
    argmin = min(losses, key=lambda r: r["loss"])["w"]

    # The prediction: the sign of ⟨g, Δ⟩ unless it is within two standard errors of zero, and a bracket around the
    # loss minimum on the predicted side (the whole range of w points when abstaining).
    sign = 0 if abs(g_dot) < 2 * g_se else (1 if g_dot > 0 else -1)
    lo, hi, open_end = bracket_of(ws, [r["loss"] for r in losses], sign)
    return Diagnosis(sign=sign, bracket=[lo, hi], bracket_open=open_end, cosine=cosine, g_dot_delta=g_dot, g_dot_delta_se=g_se,
                     grad_norm=grad_norm, delta_norm=delta_norm, loss_argmin_w=argmin, losses=losses, batches=n,
                     images=sum(s.images for s in shares), seconds=round(seconds, 3))


def bracket_of(ws: Sequence[float], losses: Sequence[float], sign: int) -> tuple[float, float, bool]:
    """(w_lo, w_hi, open) around the lowest loss among the w points on the predicted side (0 included): the
    neighbours of the minimum, which bracket it for a unimodal curve; `open` when the minimum is the last point
    on that side (the curve may go on falling beyond it). Abstaining (sign 0): the whole range."""
    if sign == 0:
        return min(ws), max(ws), False
    side = sorted(((w, f) for w, f in zip(ws, losses) if w * sign >= 0), key=lambda r: abs(r[0]))  # from w = 0 outwards
    if len(side) < 2:  # no w point on the predicted side: nothing to bracket with
        return min(ws), max(ws), False
    k = min(range(len(side)), key=lambda i: side[i][1])
    a, b = side[max(k - 1, 0)][0], side[min(k + 1, len(side) - 1)][0]
    return min(a, b), max(a, b), k == len(side) - 1


def describe(d: dict) -> str:
    """One line: the prediction, the bracket, the cosine, the loss argmin and the seconds."""
    verdict = {1: "+1 (w > 0 helps)", -1: "-1 (w < 0 helps)", 0: "0 (abstain: g·Δ within 2 standard errors of 0)"}[d["sign"]]
    lo, hi = d["bracket"]
    return (f"sign {verdict}, bracket [{lo:g}, {hi:g}]{' (open: the loss still falls at its end)' if d.get('bracket_open') else ''}, "
            f"g·Δ {d['g_dot_delta']:.4g} ± {d['g_dot_delta_se']:.2g}, cosine(g, −Δ) {d['cosine']:.4f}, "
            f"loss argmin w {d['loss_argmin_w']:g}, {d['seconds']:.1f} s on {d['images']} real samples")


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _se(xs: Sequence[float]) -> float:
    """Standard error of the mean over batches (sample sd, n − 1)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)
