"""Every random draw keyed by (seed, stream, index): the same sample, batch or noise for any worker layout."""

from __future__ import annotations

import hashlib

import numpy as np


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
