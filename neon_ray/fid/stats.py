"""Feature moments that merge exactly across shards, and the Fréchet distance (via torch-fidelity).

Each shard keeps (n, μ, M = Σ(x−μ)(x−μ)ᵀ) in float64. Merging (Chan et al.):
n = n_a + n_b, δ = μ_b − μ_a, μ = μ_a + δ·n_b/n, M = M_a + M_b + δδᵀ·n_a·n_b/n; Σ = M/(n−1).
Raw float32 sums Σx, Σxxᵀ lose digits when features have a large offset, so they are never used.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from ..errors import NeonError


@dataclass
class Moments:
    n: int
    mean: np.ndarray  # (D,) float64
    m2: np.ndarray  # (D, D) float64, Σ(x−μ)(x−μ)ᵀ

    @classmethod
    def empty(cls, dim: int) -> "Moments":
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, features: np.ndarray) -> "Moments":
        x = np.asarray(features, dtype=np.float64)  # (N, D)
        mean = x.mean(axis=0)
        centred = x - mean  # two-pass within the shard: exact up to float64 rounding
        return cls(len(x), mean, centred.T @ centred)

    def merge(self, other: "Moments") -> "Moments":
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
        return Moments(n, mean, m2)

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise NeonError(f"FID needs at least 2 images, got {self.n}")
        return self.m2 / (self.n - 1)


def merge_all(parts) -> Moments:
    parts = list(parts)
    if not parts:
        raise NeonError("no feature statistics to merge (empty sample set)")
    out = Moments.empty(len(parts[0].mean))
    for p in parts:
        out = out.merge(p)
    return out


@dataclass
class Statistics:
    """μ, Σ of a set of images in one extractor's feature space; `extractor` fingerprints that space."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str

    @classmethod
    def from_moments(cls, m: Moments, extractor: str) -> "Statistics":
        return cls(m.mean, m.sigma, m.n, extractor)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), extractor=np.array(self.extractor))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> "Statistics":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
                n = int(z["n"]) if "n" in z else 0
                extractor = str(z["extractor"]) if "extractor" in z else "unknown"
        except Exception as exc:  # noqa: BLE001 - np.load raises many types on corrupt input
            raise NeonError(f"corrupt statistics file {source}: {type(exc).__name__}") from None
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise NeonError(f"statistics file {source}: mu {mu.shape} and sigma {sigma.shape} do not match")
        return cls(mu, sigma, n, extractor)


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """FID between two statistics of the same extractor, computed by torch-fidelity's own function."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if a.extractor != b.extractor:
        raise NeonError(f"statistics come from different feature extractors ({a.extractor} vs {b.extractor}); recompute one of them")
    if a.mu.shape != b.mu.shape:
        raise NeonError(f"statistics have different feature sizes ({a.mu.shape[0]} vs {b.mu.shape[0]})")
    return float(fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, verbose=False)[KEY_METRIC_FID])


def describe(s: Statistics) -> str:
    return json.dumps({"n": s.n, "dim": int(s.mu.shape[0]), "extractor": s.extractor})
