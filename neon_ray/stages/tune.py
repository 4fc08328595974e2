"""Stage `tune`: the search for w (Ray Tune, see the `tuning` package). Each trial merges θ_neon(w) and
scores it on the evaluation seeds of the base; the best merged model is kept and registered in MLflow."""

from __future__ import annotations

import logging

from .. import storage
from ..config import RunConfig, TuneConfig, fingerprint
from ..context import StageContext
from ..manifest import Manifest
from ..merge import merge_uris
from ..runtime.checkpoints import dataset_of, spec_of
from ..runtime.cluster import ensure_ray
from ..scoring import extractor_fingerprint, reference_statistics, reference_uri, require_reference

log = logging.getLogger("neon_ray")


def trial_parts(cfg: RunConfig) -> tuple:
    """What one trial's score depends on besides θ_base and θ_ft. Not the grid: a w scored once is reused by any grid holding it."""
    return (cfg.scoring_sampler(), cfg.evaluate.hash_parts(), extractor_fingerprint(cfg), cfg.generate.bf16,
            cfg.tune.allow_negative_w)


def config_parts(cfg: RunConfig) -> tuple:
    """The stage is current only for the grid it searched; a changed grid reruns it (scoring only the new w)."""
    return (sorted(float(w) for w in cfg.tune.w_grid), *trial_parts(cfg))


def run(section: TuneConfig, ctx: StageContext) -> Manifest:
    cfg = ctx.cfg
    base, finetuned = ctx.input_uri("base"), ctx.input_uri("finetune")
    trial_hash = fingerprint("tune-trial", *trial_parts(cfg), ctx.upstream_hashes["base"], ctx.upstream_hashes["finetune"])
    require_reference(cfg)
    rec = ctx.start()
    ensure_ray(cfg.ray)
    from tuning.search import grid_search  # imports Ray Tune: after ensure_ray has set the workers' environment
    from tuning.trainable import MODEL, SCORES, trial_dir

    reference = reference_statistics(cfg)  # computed once on the driver, read by every trial
    trials, best = grid_search(cfg, base, finetuned, rec.dir, trial_hash, f"tune-{ctx.config_hash}", ctx.tracker, ctx.run_id,
                               fresh=ctx.force)
    best_model = storage.join(trial_dir(rec.dir, best["w"]), MODEL)
    if not storage.exists(best_model):  # a trial reused from an earlier grid, whose merged model was not the best then
        merge_uris(base, finetuned, best_model, best["w"], allow_negative=section.allow_negative_w)
    for r in trials:  # keep only the best merged model (the others are one `neon-ray merge` away); only files made here
        if r is not best:
            storage.remove(storage.join(trial_dir(rec.dir, r["w"]), MODEL))
    rec.inputs = {"base_checkpoint": base, "finetuned": finetuned, "reference": reference_uri(cfg)}
    rec.outputs = {"best_model": best_model, "best_samples": storage.resolve(cfg.output, best["samples"]),
                   "trials": storage.join(rec.dir, "trials")}
    rec.metrics = {"best_w": best["w"], "best_fid": best["fid"], "best_class_consistency": best["class_consistency"],
                   "trials": [{k: r.get(k) for k in ("w",) + SCORES} for r in trials]}
    rec.params = {"w_grid": list(section.w_grid), "max_concurrent_trials": section.max_concurrent_trials}
    if ctx.tracker is not None:
        registered = ctx.tracker.register_model(
            ctx.run_id, best_model, spec_of(cfg), cfg.scoring_sampler(),
            {"w": best["w"], "fid": best["fid"], "sampler": cfg.scoring_sampler().model_dump(mode="json"), "n_eval": best["n"],
             "feature_space": reference.feature_space, "config_hash": ctx.config_hash, "codec": dataset_of(cfg).kind})
        if registered:
            rec.params |= {"registered_model": registered["name"], "registered_version": registered["version"]}
    return rec.finish()
