"""Precision and recall on k-NN feature manifolds (Kynkäänniemi et al. 2019), in blocked pure torch.

A set's manifold is the union of balls around each of its features, reaching that feature's k-th
nearest neighbour in the set. Precision: the fraction of generated features inside the real manifold;
recall: the fraction of real features inside the generated one. Same definition as torch-fidelity's
`prc_features_to_metric` (tests check the two agree), but the real set's radii can be computed once
and cached beside the reference features, and distances are built `block` rows at a time, so at most
block × N of them exist at once (never 10k × 10k).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import NeonError

BLOCK = 1000  # rows of a distance matrix held at once: 1000 × 10k float32 = 40 MB


def knn_radii(features: np.ndarray, k: int, block: int = BLOCK) -> np.ndarray:
    """(N,) distance from each feature to its k-th nearest other feature of the same set."""
    if len(features) <= k:
        raise NeonError(f"evaluate.prc_k: precision/recall with k={k} needs more than {k} samples per set, got {len(features)}")
    x = torch.from_numpy(np.ascontiguousarray(features, np.float32))  # (N, D)
    # k + 1 smallest: each feature is its own nearest neighbour at distance 0.
    radii = [torch.cdist(xb, x).topk(k + 1, dim=1, largest=False).values[:, -1] for xb in x.split(block)]
    return torch.cat(radii).numpy()


def coverage(queries: np.ndarray, features: np.ndarray, radii: np.ndarray, block: int = BLOCK) -> float:
    """Fraction of `queries` (N, D) inside at least one ball (features (M, D), radii (M,))."""
    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
    x = torch.from_numpy(np.ascontiguousarray(features, np.float32))
    r = torch.from_numpy(np.ascontiguousarray(radii, np.float32))  # (M,)
    inside = [(torch.cdist(qb, x) <= r).any(dim=1) for qb in q.split(block)]  # each (b,)
    return float(torch.cat(inside).float().mean())


def precision_recall(generated: np.ndarray, real: np.ndarray, k: int, real_radii: np.ndarray | None = None,
                     block: int = BLOCK) -> dict[str, float]:
    """{precision, recall} of `generated` (N, D) against `real` (M, D); `real_radii` (M,) when cached."""
    if generated.shape[1] != real.shape[1]:
        raise NeonError(f"precision/recall: feature sizes differ ({generated.shape[1]} vs {real.shape[1]})")
    gen_radii = knn_radii(generated, k, block)
    real_radii = knn_radii(real, k, block) if real_radii is None else real_radii
    assert len(real_radii) == len(real), "one radius per real feature"
    return {"precision": coverage(generated, real, real_radii, block), "recall": coverage(real, generated, gen_radii, block)}


def keep_mask(n: int, cap: int, seed: int) -> np.ndarray:
    """Which of n samples (by index) give features for precision/recall: all, or a seeded `cap` of them.

    Chosen by index on the driver, so the kept set is the same for any number of shards.
    """
    keep = np.zeros(n, dtype=bool)
    if n <= cap:
        keep[:] = True
    else:
        keep[np.random.default_rng(seed).choice(n, size=cap, replace=False)] = True
    return keep
