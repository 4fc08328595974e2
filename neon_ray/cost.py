"""The whole method's cost, relative to the base's training (issue 26): pure arithmetic over what the stages recorded.

The unit is the one `extra_compute_fraction` has always used: a training image-equivalent, one image through the
network's forward and backward pass (≈ 3 forward passes: the backward costs about twice the forward). Then
- fine-tune: its images seen (one image-equivalent each);
- generation of S: |S| × the sampler's network evaluations per sample / 3;
- the search: every image a trial sampled (its highest rung's n) × the evaluations per sample at the trial's
  sampler settings / 3, the evaluate stage's and the rescored headline's samples likewise, and the diagnosis
  (one forward + backward and one forward per w point for each held-out sample).
Network evaluations per sample are estimated from the sampler settings: `steps` (1 when the sampler has none,
e.g. a one-pass token sampler) × 2 with classifier-free guidance (γ ≠ 1: a conditional and an unconditional pass).
Solvers with several evaluations per step (Heun) or per cluster (xAR) cost more than this counts, and feature
extraction for FID is left out (a small extractor, a fraction of one forward pass of the generator): the sampled
image-equivalents are a lower bound. The stages' measured wall seconds are reported beside them.
"""

from __future__ import annotations

from typing import Any


def evaluations_per_sample(settings: Any) -> int:
    """Network evaluations to sample one image with these sampler settings (a typed schema or a dict)."""
    get = settings.get if isinstance(settings, dict) else lambda k, d=None: getattr(settings, k, d)
    steps = get("steps", None)
    guidance = get("guidance", None)
    return int(steps or 1) * (2 if guidance is not None and float(guidance) != 1.0 else 1)


def sampling_equivalents(n: int, settings: Any) -> float:
    """Training image-equivalents of sampling n images (one training image ≈ 3 forward passes)."""
    return n * evaluations_per_sample(settings) / 3


def fractions(base_train_images: int | None, finetune: float, generate: float, search: float) -> dict[str, float | None]:
    """The extra-compute fraction three ways: the fine-tune alone (today's figure), + generation of S, + the search."""
    if not base_train_images:
        return {"finetune": None, "with_generation": None, "with_search": None}
    return {"finetune": finetune / base_train_images, "with_generation": (finetune + generate) / base_train_images,
            "with_search": (finetune + generate + search) / base_train_images}
