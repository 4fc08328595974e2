"""Pure-torch training helpers shared by pretrain and finetune (no Ray, no DeepSpeed): schedules, EMA."""

from __future__ import annotations

import math

import torch
from torch import nn


def warmup_cosine(step: int, total: int, warmup: int, final_fraction: float = 0.0) -> float:
    """LR multiplier: linear warm-up, then cosine decay to `final_fraction`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def linear_warmup(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
