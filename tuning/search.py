"""Running the search with a Ray Tune `Tuner` whose experiment lives under the run's output.

The searcher (`tune.search`) and scheduler (`tune.scheduler`) come from `searchers`. A failed trial is
retried (`tune.max_failures`, Tune's FailureConfig); a search that was stopped (a killed driver, `ray job
stop`) is resumed with `Tuner.restore` from the experiment on the output, and every rung a trial already
scored is reused from its folder, so only what is missing is scored again. Ctrl-C stops the command, never just
the search (`fit_or_interrupt`).

Picking from Tune's `ResultGrid`: FID is biased in n (fewer samples, higher FID), so trials are compared
only at equal n. Within each arm (base: w = 0; Neon: w > 0) the pick is the lowest FID among the trials
that reached the arm's highest rung; with ASHA those are the trials that were best at every rung below.
"""

from __future__ import annotations

import logging
from functools import partial

from neon_ray import storage
from neon_ray.config import RunConfig
from neon_ray.errors import NeonError
from neon_ray.runtime.cluster import ray_storage
from neon_ray.runtime.ray_train import off_the_main_thread
from neon_ray.scoring import reference_uri

from .callbacks import MLflowTrials
from .searchers import make_scheduler, make_search
from .spaces import FIDELITY, W, overrides_of, trial_key
from .trainable import neon_trial, read_rungs

log = logging.getLogger("neon_ray")


def run_search(cfg: RunConfig, base: str, finetuned: str, tune_dir: str, trial_hash: str, name: str, tracker=None,
               parent_run: str | None = None, fresh: bool = False, donors: tuple[str, ...] = (),
               prior: tuple[float, float] | None = None) -> list[dict]:
    """Run (or resume) the search; returns one entry per distinct trial config: its rung results, best rung last.
    `donors`: sample folders the base arm may copy from (trainable.neon_trial); `prior`: the w bracket to start from
    (`tune.prior`, see searchers.make_search)."""
    from ray import tune

    t = cfg.tune
    rungs = cfg.search_rungs()
    trainable = tune.with_resources(
        partial(neon_trial, cfg_json=cfg.for_workers(), base=base, finetuned=finetuned, reference=reference_uri(cfg),
                tune_dir=tune_dir, trial_hash=trial_hash, rungs=rungs, donors=donors),
        {"cpu": t.cpus_per_trial},
    )
    where = ray_storage(storage.join(tune_dir, "ray"))
    experiment = f"{where['storage_path'].rstrip('/')}/{name}"
    MLflowTrials.attach(tracker, parent_run)
    try:
        if fresh:
            storage.remove(storage.join(tune_dir, "ray", name))
        search_alg, space, num_samples = make_search(cfg, prior, tune_dir)
        if not fresh and tune.Tuner.can_restore(experiment, storage_filesystem=where.get("storage_filesystem")):
            log.info("tune: resuming the search stored at %s", storage.redact_uri(storage.join(tune_dir, "ray", name)))
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                       param_space=space or None, storage_filesystem=where.get("storage_filesystem"))
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(metric="fid", mode="min", max_concurrent_trials=t.max_concurrent_trials,
                                            search_alg=search_alg, scheduler=make_scheduler(cfg), num_samples=num_samples,
                                            # one trial process for trial after trial: no process, torch and
                                            # neon_ray start-up per trial (seconds each, most of a small rung)
                                            reuse_actors=True),
                run_config=tune.RunConfig(name=name, verbose=0, callbacks=[MLflowTrials()],
                                          failure_config=tune.FailureConfig(max_failures=t.max_failures), **where),
            )
        grid = fit_or_interrupt(tuner)
    finally:
        MLflowTrials.attach(None, None)
    if grid.errors:
        last = str(grid.errors[0]).strip().splitlines()[-1][:300]
        raise NeonError(f"tune: {len(grid.errors)} trial(s) failed after {t.max_failures} retries; first: {last}")
    return collect(cfg, grid, tune_dir, trial_hash, rungs)


def fit_or_interrupt(tuner):
    """`tuner.fit()`, where a stop signal stops the command. On the main thread Tune installs handlers of its own that
    take Ctrl-C and SIGUSR1 as "end the search" and return the trials so far as a finished ResultGrid: the stage would
    then pick, rescore and write its manifest from a partial search, and a rerun would find it up to date. Off the
    main thread Tune installs none: Ctrl-C raises KeyboardInterrupt here as anywhere else (exit 130, a rerun resumes),
    and SIGUSR1 ends the command with nothing written."""
    return off_the_main_thread(tuner.fit)


def collect(cfg: RunConfig, grid, tune_dir: str, trial_hash: str, rungs: list[int]) -> list[dict]:
    """Each distinct trial config of the ResultGrid with the rungs it scored (read from its folder), sorted by (w, setting)."""
    trials: dict[str, dict] = {}
    for result in grid:
        config = {k: v for k, v in result.config.items() if k != FIDELITY}
        key = trial_key(config)
        scored = read_rungs(tune_dir, config, trial_hash, cfg, rungs)
        if not scored:
            continue  # stopped before its first rung finished
        if key not in trials or len(scored) > len(trials[key]["rungs"]):
            trials[key] = {"key": key, "w": float(config[W]), "sampler": overrides_of(config), "rungs": scored}
    if not trials:
        raise NeonError(f"tune: no trial finished a rung under {storage.redact_uri(tune_dir)}")
    return sorted(trials.values(), key=lambda r: (r["w"], sorted(r["sampler"].items())))


def pick(trials: list[dict], arm: str) -> dict | None:
    """The best trial of an arm ("base": w = 0, "neon": w > 0) compared at the arm's highest rung (equal n)."""
    members = [t for t in trials if (t["w"] == 0.0) == (arm == "base")]
    if not members:
        return None
    top = max(len(t["rungs"]) for t in members)
    return min((t for t in members if len(t["rungs"]) == top), key=lambda t: t["rungs"][-1]["fid"])


def flat(trial: dict) -> dict:
    """A trial as one row: w, its sampler fields and the scores of its highest rung (with `rungs_scored`)."""
    last = trial["rungs"][-1]
    return {"w": trial["w"], "key": trial["key"], "sampler": trial["sampler"], "rungs_scored": len(trial["rungs"]),
            **{k: last.get(k) for k in ("fid", "precision", "recall", "fid_floor", "class_consistency", "n", "model", "samples")},
            "fid_by_n": {str(r["n"]): r["fid"] for r in trial["rungs"]},
            "floor_by_n": {str(r["n"]): r.get("fid_floor") for r in trial["rungs"]}}
