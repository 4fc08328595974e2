"""Running a search over w with a Ray Tune `Tuner` whose experiment lives under the run's output.

A failed trial is retried (`tune.max_failures`, Tune's FailureConfig); a search that was stopped (a
killed driver, `ray job stop`) is resumed with `Tuner.restore` from the experiment on the output, so
only unfinished trials run again, and a retried trial keeps its merged model and the parts of its
evaluation set that were already sampled. The best trial comes from Tune's `ResultGrid`.
"""

from __future__ import annotations

import logging
from functools import partial

from neon_ray import storage
from neon_ray.config import RunConfig
from neon_ray.errors import NeonError
from neon_ray.runtime.cluster import ray_storage
from neon_ray.scoring import reference_uri

from .callbacks import MLflowTrials
from .spaces import w_grid_space
from .trainable import neon_trial, read_result

log = logging.getLogger("neon_ray")


def grid_search(cfg: RunConfig, base: str, finetuned: str, tune_dir: str, trial_hash: str, name: str, tracker=None,
                parent_run: str | None = None, fresh: bool = False) -> tuple[list[dict], dict]:
    """Score every w of `tune.w_grid` (trials already scored under `trial_hash` are reused).

    Returns (results sorted by w, the best result), the best as Tune's ResultGrid picks it.
    """
    from ray import tune

    t = cfg.tune
    trainable = tune.with_resources(
        partial(neon_trial, cfg_json=cfg.for_workers(), base=base, finetuned=finetuned, reference=reference_uri(cfg),
                tune_dir=tune_dir, trial_hash=trial_hash),
        {"cpu": t.cpus_per_trial},
    )
    where = ray_storage(storage.join(tune_dir, "ray"))
    experiment = f"{where['storage_path'].rstrip('/')}/{name}"
    space = w_grid_space(t.w_grid)
    MLflowTrials.attach(tracker, parent_run)
    try:
        if fresh:
            storage.remove(storage.join(tune_dir, "ray", name))
        if not fresh and tune.Tuner.can_restore(experiment, storage_filesystem=where.get("storage_filesystem")):
            log.info("tune: resuming the search stored at %s", storage.redact_uri(storage.join(tune_dir, "ray", name)))
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True, param_space=space,
                                       storage_filesystem=where.get("storage_filesystem"))
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(metric="fid", mode="min", max_concurrent_trials=t.max_concurrent_trials),
                run_config=tune.RunConfig(name=name, verbose=0, callbacks=[MLflowTrials()],
                                          failure_config=tune.FailureConfig(max_failures=t.max_failures), **where),
            )
        grid = tuner.fit()
    finally:
        MLflowTrials.attach(None, None)
    if grid.errors:
        last = str(grid.errors[0]).strip().splitlines()[-1][:300]
        raise NeonError(f"tune: {len(grid.errors)} trial(s) failed after {t.max_failures} retries; first: {last}")
    best_w = float(grid.get_best_result(metric="fid", mode="min").config["w"])
    results = [read_result(tune_dir, float(w), trial_hash) for w in t.w_grid]
    missing = [w for w, r in zip(t.w_grid, results) if r is None]
    if missing:
        raise NeonError(f"tune: trials for w={missing} finished without a result under {storage.redact_uri(tune_dir)}")
    results = sorted(results, key=lambda r: r["w"])
    return results, next(r for r in results if r["w"] == best_w)
