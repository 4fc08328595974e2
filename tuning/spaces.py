"""Search spaces over Neon's extrapolation weight w.

FID(w) is steep and asymmetric near the optimum (measured: best w 0.3–0.5, w = 1 already far worse),
so grids must be fine at small w.
"""

from __future__ import annotations

from ray import tune

# The default grid: dense below 0.5, sparse above (see neon_ray.config.TuneConfig.w_grid).
DEFAULT_W_GRID = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)


def w_grid_space(w_grid) -> dict:
    """Every trial one w; all trials share evaluation seeds and labels (common random numbers)."""
    return {"w": tune.grid_search([float(w) for w in w_grid])}
