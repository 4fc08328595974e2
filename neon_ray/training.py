"""Pure-torch training helpers shared by pretrain and finetune (no Ray, no DeepSpeed)."""

from __future__ import annotations

import hashlib
import math
import sys

import numpy as np
import torch
from torch import nn


def derive_seed(*keys: object) -> int:
    """A 63-bit seed from any tuple of keys (run seed, stream name, index / rank / step)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_seeds(seed: int, stream: str, indices) -> list[int]:
    """Per-image seeds: image i of a stream is seeded by (seed, stream, i), whatever the worker layout."""
    return [derive_seed(seed, stream, int(i)) for i in indices]


def balanced_labels(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Class-balanced conditioning: image i gets class i mod K (equal counts for any multiple of K)."""
    return (np.asarray(indices, dtype=np.int64) % num_classes).astype(np.int64)


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


def progress(message: str) -> None:
    """A progress line from a training worker. Ray Train V2 reroutes `print` through a logger that
    echoes it twice; writing to stdout directly gives one line on the driver."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()
