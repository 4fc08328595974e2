"""Classifier-free guidance (Ho & Salimans 2022), written once for every family that has it.

out = out_u + γ·(out_c − out_u). γ = 1 needs only the conditional pass and γ = 0 only the
unconditional one; otherwise both passes run batched in one forward (labels, then null labels).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def classifier_free_guidance(forward: Callable[[torch.Tensor, int], torch.Tensor], labels: torch.Tensor, null_label: int,
                             guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(guided output, output of the pass at the requested labels).

    `forward(y, copies)` runs the network on labels `y` with its other inputs repeated `copies` times
    along the batch and returns a float tensor. The second result is the conditional pass (the
    unconditional one when γ = 0): families take outputs that are not guided, such as a learned
    variance, from it.
    """
    if guidance == 1.0:
        out = forward(labels, 1)
        return out, out
    null = torch.full_like(labels, null_label)
    if guidance == 0.0:
        out = forward(null, 1)
        return out, out
    out_c, out_u = forward(torch.cat([labels, null]), 2).chunk(2)
    return out_u + guidance * (out_c - out_u), out_c


def tile(x: torch.Tensor, copies: int) -> torch.Tensor:
    """`copies` copies of `x` stacked along the batch (no copy for 1): the other inputs of a guided forward."""
    return x if copies == 1 else torch.cat([x] * copies)
