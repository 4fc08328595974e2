"""The paper's 2-D toy target (App. B): N(0, [[2, 1], [1, 2]]), a small real set and a large reference set.

Options (`data.options`): `n_train` (1000, the paper's real set), `n_test` (reference set size,
default 1,000,000: Fréchet distances against it are exact to ~1e-3), `mean`, `cov`, `seed`.
Samples are float32 vectors; there are no classes (every label is 0).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import Dataset, Split, register_dataset

PAPER_COV = ((2.0, 1.0), (1.0, 2.0))


@register_dataset
class Gaussian2D(Dataset):
    name = "gaussian2d"
    sample_shape = (2,)
    num_classes = 1
    kind = "vector"

    def _params(self) -> tuple[np.ndarray, np.ndarray, int, int, int]:
        o = {"n_train": 1000, "n_test": 1_000_000, "mean": (0.0, 0.0), "cov": PAPER_COV, "seed": 0} | self.options
        unknown = sorted(set(o) - {"n_train", "n_test", "mean", "cov", "seed"})
        if unknown:
            raise ConfigError(f"data.options.{unknown[0]}: unknown option for gaussian2d (n_train, n_test, mean, cov, seed)")
        mean, cov = np.asarray(o["mean"], np.float64), np.asarray(o["cov"], np.float64)
        if mean.shape != (2,) or cov.shape != (2, 2) or not np.allclose(cov, cov.T) or np.linalg.eigvalsh(cov).min() <= 0:
            raise ConfigError("data.options.cov: must be a symmetric positive-definite 2×2 matrix (mean: 2 numbers)")
        for key in ("n_train", "n_test"):
            if int(o[key]) < 2:
                raise ConfigError(f"data.options.{key}: must be ≥ 2, got {o[key]}")
        return mean, cov, int(o["n_train"]), int(o["n_test"]), int(o["seed"])

    def load(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        mean, cov, n_train, n_test, seed = self._params()
        n = n_train if split == "train" else n_test
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])  # disjoint streams per split
        x = rng.multivariate_normal(mean, cov, size=n).astype(np.float32)
        return x, np.zeros(n, np.int64)

    def exact_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """The target's true (μ, Σ), for closed-form Fréchet distances."""
        mean, cov, *_ = self._params()
        return mean, cov
