"""Running a search over w with a Ray Tune `Tuner` whose experiment state lives under the run's output."""

from __future__ import annotations

from functools import partial

from neon_ray import storage
from neon_ray.config import RunConfig
from neon_ray.errors import NeonError
from neon_ray.runtime.cluster import ray_storage
from neon_ray.scoring import reference_uri

from .callbacks import MLflowTrials
from .spaces import w_grid_space
from .trainable import neon_trial, read_result


def grid_search(cfg: RunConfig, base: str, finetuned: str, tune_dir: str, trial_hash: str, name: str, tracker=None,
                parent_run: str | None = None) -> list[dict]:
    """Score every w of `tune.w_grid` (trials already scored under `trial_hash` are reused); results sorted by w."""
    from ray import tune

    t = cfg.tune
    trainable = tune.with_resources(
        partial(neon_trial, cfg_json=cfg.for_workers(), base=base, finetuned=finetuned, reference=reference_uri(cfg),
                tune_dir=tune_dir, trial_hash=trial_hash),
        {"cpu": t.cpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=w_grid_space(t.w_grid),
        tune_config=tune.TuneConfig(metric="fid", mode="min", max_concurrent_trials=t.max_concurrent_trials),
        run_config=tune.RunConfig(name=name, verbose=0, callbacks=[MLflowTrials(tracker, parent_run)],
                                  **ray_storage(storage.join(tune_dir, "ray"))),
    )
    grid = tuner.fit()
    if grid.errors:
        raise NeonError(f"{len(grid.errors)} tune trial(s) failed; first: {str(grid.errors[0]).strip().splitlines()[-1][:300]}")
    results = [read_result(tune_dir, float(w), trial_hash) for w in t.w_grid]
    missing = [w for w, r in zip(t.w_grid, results) if r is None]
    if missing:
        raise NeonError(f"tune: trials for w={missing} finished without a result under {storage.redact_uri(tune_dir)}")
    return sorted(results, key=lambda r: r["w"])
