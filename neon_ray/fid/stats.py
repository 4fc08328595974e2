"""Feature moments that merge exactly across shards, statistics files, and the Fréchet distance (torch-fidelity's).

Each shard keeps (n, μ, M = Σ(x−μ)(x−μ)ᵀ) in float64. Merging (Chan et al.):
n = n_a + n_b, δ = μ_b − μ_a, μ = μ_a + δ·n_b/n, M = M_a + M_b + δδᵀ·n_a·n_b/n; Σ = M/(n−1).
Raw float32 sums Σx, Σxxᵀ lose digits when features have a large offset, so they are never used.

A statistics file is an `.npz` (read with allow_pickle=False) holding `mu`, `sigma`, `n` and two tags:
`feature_space` (what may be compared: e.g. `inception-2015-12-05/pool3`) and `extractor` (the exact
extractor that made it). Published ADM (`mu`, `sigma`, `mu_s`, ...) and EDM (`mu`, `sigma`) files carry
no tag; `import_published` tags them with the feature space the user names.
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
    """μ, Σ of n samples in one feature space; `feature_space` decides comparability, `extractor` is provenance."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    feature_space: str
    extractor: str = ""
    source: str = ""
    identity: str = ""  # JSON of what the statistics are of (neon_ray.scoring.reference_identity); "" when unknown

    @classmethod
    def from_moments(cls, m: Moments, feature_space: str, extractor: str = "", source: str = "") -> "Statistics":
        return cls(m.mean, m.sigma, m.n, feature_space, extractor, source)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), feature_space=np.array(self.feature_space),
                 extractor=np.array(self.extractor), source=np.array(self.source), identity=np.array(self.identity))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> "Statistics":
        """A tagged statistics file; an untagged (published) one is refused with the import command to run."""
        arrays = _read_npz(data, source)
        if "feature_space" not in arrays and "extractor" not in arrays:
            raise NeonError(f"statistics file {source} carries no feature-space tag (a published ADM/EDM file?); "
                            f"import it with `neon-ray ref-stats --config CONFIG --import {source}`")
        mu, sigma = _mu_sigma(arrays, source)
        space = str(arrays.get("feature_space", arrays.get("extractor")))  # legacy files: one `extractor` tag
        return cls(mu, sigma, int(arrays["n"]) if "n" in arrays else 0, space, str(arrays.get("extractor", space)),
                   str(arrays.get("source", source)), str(arrays.get("identity", "")))


def import_published(data: bytes, source: str, feature_space: str, dim: int | None = None) -> Statistics:
    """Published reference statistics (ADM: `mu`, `sigma`, `mu_s`, `sigma_s`, `arr_0`; EDM: `mu`, `sigma`), tagged."""
    arrays = _read_npz(data, source, keys=("mu", "sigma", "n", "feature_space", "extractor"))
    tagged = str(arrays.get("feature_space", arrays.get("extractor", feature_space)))
    if tagged != feature_space:
        raise NeonError(f"statistics file {source} is tagged with feature space {tagged}, not {feature_space}")
    mu, sigma = _mu_sigma(arrays, source)
    if dim is not None and len(mu) != dim:
        raise NeonError(f"statistics file {source} has {len(mu)}-d features; feature space {feature_space} is {dim}-d")
    return Statistics(mu, sigma, int(arrays["n"]) if "n" in arrays else 0, feature_space, "imported", source)


def _read_npz(data: bytes, source: str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` (only `keys` when given: ADM files also hold 10k images we do not need)."""
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with z:
            return {k: np.asarray(z[k]) for k in z.files if keys is None or k in keys}
    except Exception as exc:  # noqa: BLE001 - np.load raises many types on corrupt input
        raise NeonError(f"corrupt or truncated statistics file {source}: {type(exc).__name__}: {str(exc)[:120]}") from None


def _mu_sigma(arrays: dict[str, np.ndarray], source: str) -> tuple[np.ndarray, np.ndarray]:
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise NeonError(f"statistics file {source} lacks {', '.join(missing)} (has {sorted(arrays)})")
    try:
        mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
    except (TypeError, ValueError):
        raise NeonError(f"statistics file {source}: mu and sigma must be numeric arrays") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise NeonError(f"statistics file {source}: mu {mu.shape} and sigma {sigma.shape} do not match")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise NeonError(f"statistics file {source}: mu or sigma holds non-finite values")
    return mu, sigma


def check_comparable(a: Statistics, b: Statistics) -> None:
    if a.feature_space != b.feature_space:
        raise NeonError(f"statistics from different feature spaces cannot be compared: {a.feature_space} vs {b.feature_space} "
                        "(recompute one with the other's evaluate.extractor)")
    if a.mu.shape != b.mu.shape:
        raise NeonError(f"statistics have different feature sizes ({a.mu.shape[0]} vs {b.mu.shape[0]})")


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """FID between two statistics of one feature space, computed by torch-fidelity's own function."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    check_comparable(a, b)
    return float(fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, verbose=False)[KEY_METRIC_FID])


def along_line(a: Statistics, b: Statistics, t: float) -> Statistics:
    """Feature moments linear along a line: `a` at t = 0, `b` at t = 1 (t outside [0, 1] extrapolates).

    The line search's model of θ_w's sample distribution between two scored models (tuning.searchers.LineSearch):
    the mean and covariance of the features move linearly in w, a first-order model that holds for continuous
    samplers and for discrete (token) samplers alike, since it is the distribution's moments, not each sample's
    features, that vary smoothly with θ. An extrapolated covariance is projected onto the positive semi-definite
    cone (negative eigenvalues set to 0) so that the Fréchet distance stays defined."""
    check_comparable(a, b)
    mu = a.mu + t * (b.mu - a.mu)
    sigma = a.sigma + t * (b.sigma - a.sigma)
    if t < 0 or t > 1:
        values, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
        sigma = (vectors * np.clip(values, 0, None)) @ vectors.T
    return Statistics(mu, sigma, min(a.n, b.n), a.feature_space, a.extractor, f"{a.source} → {b.source} at t = {t:g}")


def features_to_bytes(features: np.ndarray, feature_space: str, radii: np.ndarray | None = None, k: int | None = None) -> bytes:
    """A capped feature sample (for precision/recall), tagged like its statistics, with its k-NN radii when known."""
    buf = io.BytesIO()
    extra = {} if radii is None else {"radii": np.asarray(radii, np.float32), "radii_k": np.int64(k)}
    np.savez(buf, features=np.asarray(features, np.float32), feature_space=np.array(feature_space), **extra)
    return buf.getvalue()


def features_from_bytes(data: bytes, source: str, feature_space: str) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """(features (N, D) float32, k-NN radii (N,) or None, their k or None)."""
    arrays = _read_npz(data, source)
    if "features" not in arrays or arrays["features"].ndim != 2:
        raise NeonError(f"feature file {source} lacks a 2-d `features` array")
    if str(arrays.get("feature_space", "")) != feature_space:
        raise NeonError(f"feature file {source} is in feature space {arrays.get('feature_space')}, not {feature_space}")
    features = arrays["features"].astype(np.float32)
    if "radii" in arrays and arrays["radii"].shape == (len(features),):
        return features, arrays["radii"].astype(np.float32), int(arrays["radii_k"])
    return features, None, None


def describe(s: Statistics) -> str:
    return json.dumps({"n": s.n, "dim": int(s.mu.shape[0]), "feature_space": s.feature_space, "extractor": s.extractor})
