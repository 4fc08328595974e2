"""Stage `tune`: Ray Tune over w. Each trial merges θ_neon(w) and scores it with the evaluate path.

Every trial samples with the same evaluation seeds and labels as the base model's evaluation, so FID
differences come from w, not sampling noise. Finished trials leave `result.json` and are not redone.
"""

from __future__ import annotations

import logging
import os
import tempfile

from .. import storage
from ..cluster import ensure_ray
from ..config import RunConfig, fingerprint
from ..errors import NeonError
from ..fid.stats import Statistics
from ..manifest import start, up_to_date
from ..merge import merge_uris
from .common import base_checkpoint_uri, base_identity, require_stage
from .evaluate import extractor_fingerprint, reference_statistics, reference_uri, score_checkpoint

log = logging.getLogger("neon_ray")
STAGE = "tune"
TRIAL_SCORES = ("fid", "precision", "recall", "fid_floor", "class_consistency", "n", "sample_seconds")


def trial_hash(cfg: RunConfig) -> str:
    """What one trial's score depends on. Not the grid: a w scored once is reused by any grid that holds it."""
    from .finetune import config_hash as finetune_hash

    return fingerprint(STAGE, base_identity(cfg), finetune_hash(cfg), cfg.sampler, cfg.evaluate, extractor_fingerprint(cfg),
                       cfg.generate.bf16, cfg.tune.allow_negative_w)


def config_hash(cfg: RunConfig) -> str:
    """The stage is current only for the grid it searched; a changed grid reruns it (scoring only the new w)."""
    return fingerprint(STAGE, trial_hash(cfg), sorted(float(w) for w in cfg.tune.w_grid))


def trial_dir(tune_dir: str, w: float) -> str:
    return storage.join(tune_dir, "trials", f"w={w:.6g}")


def _trial(config: dict, cfg_json: dict, base: str, finetuned: str, reference: str, tune_dir: str, config_hash: str) -> None:
    """One Tune trial: merge at w, sample the evaluation set, report FID (resumes from result.json)."""
    from ray import tune

    cfg = RunConfig.model_validate(cfg_json)
    w = float(config["w"])
    tdir = trial_dir(tune_dir, w)
    result_uri = storage.join(tdir, "result.json")
    if storage.exists(result_uri):
        done = storage.read_json(result_uri)
        if done.get("config_hash") == config_hash:
            tune.report({k: v for k, v in done.items() if isinstance(v, (int, float)) and v is not None})
            return
    model = storage.join(tdir, "model.safetensors")
    merge_uris(base, finetuned, model, w, allow_negative=cfg.tune.allow_negative_w)
    ref = Statistics.from_bytes(storage.read_bytes(reference), reference)
    scores = score_checkpoint(cfg, model, tdir, ref, settings=cfg.scoring_sampler())
    result = {"w": w, "model": model, "config_hash": config_hash,
              **{k: scores[k] for k in TRIAL_SCORES + ("samples",)}}
    storage.write_json_atomic(result_uri, result)
    tune.report({k: v for k, v in result.items() if isinstance(v, (int, float)) and v is not None})


def tune(cfg: RunConfig, force: bool = False) -> dict:
    base = base_checkpoint_uri(cfg)
    from .finetune import config_hash as finetune_hash

    finetuned = require_stage(cfg, "finetune", finetune_hash(cfg))["outputs"]["model"]
    h = config_hash(cfg)
    if (done := up_to_date(STAGE, cfg.output, h, force)) is not None:
        return done
    rec = start(STAGE, cfg.output, h)
    ensure_ray(cfg.ray)
    reference_statistics(cfg)  # computed once on the driver, read by every trial

    from functools import partial

    from ray import tune as ray_tune

    from tuning.spaces import w_grid_space

    t = cfg.tune
    trainable = ray_tune.with_resources(
        partial(_trial, cfg_json=cfg.model_dump(mode="json"), base=base, finetuned=finetuned, reference=reference_uri(cfg),
                tune_dir=rec.dir, config_hash=trial_hash(cfg)),
        {"cpu": t.cpus_per_trial},
    )
    tuner = ray_tune.Tuner(
        trainable,
        param_space=w_grid_space(t.w_grid),
        tune_config=ray_tune.TuneConfig(metric="fid", mode="min", max_concurrent_trials=t.max_concurrent_trials),
        run_config=ray_tune.RunConfig(name=f"tune-{h}", storage_path=os.path.join(tempfile.gettempdir(), "neon-ray-tune"), verbose=0),
    )
    grid = tuner.fit()
    if grid.errors:
        raise NeonError(f"{len(grid.errors)} tune trial(s) failed; first: {str(grid.errors[0]).strip().splitlines()[-1][:300]}")
    trials = sorted((storage.read_json(storage.join(trial_dir(rec.dir, float(w)), "result.json")) for w in t.w_grid), key=lambda r: r["w"])
    best = min(trials, key=lambda r: r["fid"])
    if not storage.exists(best["model"]):  # a trial reused from an earlier grid, whose merged model was not the best then
        merge_uris(base, finetuned, best["model"], best["w"], allow_negative=t.allow_negative_w)
    for r in trials:  # keep only the best merged model: the others are one command away
        if r is not best:
            storage.remove(r["model"])
    rec.inputs = {"base_checkpoint": base, "finetuned": finetuned, "reference": reference_uri(cfg)}
    rec.outputs = {"best_model": best["model"], "best_samples": best["samples"], "trials": storage.join(rec.dir, "trials")}
    rec.metrics = {"best_w": best["w"], "best_fid": best["fid"], "best_class_consistency": best["class_consistency"],
                   "trials": [{k: r.get(k) for k in ("w",) + TRIAL_SCORES} for r in trials]}
    rec.params = {"w_grid": list(t.w_grid), "max_concurrent_trials": t.max_concurrent_trials}
    return rec.finish()
