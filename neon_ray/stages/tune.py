"""Stage `tune`: the search over w and the sampler (Ray Tune, see the `tuning` package), then the headline.

Each trial scores θ(w) at one sampler setting on the evaluation seeds of the base, rung by rung. The best
base (w = 0, searched over the same sampler fields) and the best Neon trial, each compared at equal n, are
rescored on `tune.final_seeds` fresh evaluation seed sets (tuning.headline). The best merged model is kept
and registered in MLflow; the others are one `neon-ray merge` away.
"""

from __future__ import annotations

import logging
import os
import tempfile

from .. import storage
from ..config import RunConfig, TuneConfig
from ..context import StageContext
from ..errors import NeonError
from ..inputs import BASE, StageInputs, fingerprint_inputs
from ..manifest import Manifest
from ..runtime.cluster import ensure_ray
from ..runtime.run_model import dataset_of, spec_of
from ..scoring import reference_statistics, reference_uri, require_reference
from ..tracking import TRIAL_GRID

log = logging.getLogger("neon_ray")


# What one trial's score depends on besides its w and its sampler fields (those name its folder): a trial scored
# under the same fingerprint is reused by a later search.
TRIAL_INPUTS = StageInputs(fields=("model.family", "model.preset", "model.options", "evaluate", "tune.allow_negative_w"),
                           derived=("dataset", "data_spec", "scoring_sampler", "extractor"), needs=(BASE, "finetune"))
# The stage is current only for the search it ran; a changed search reruns it (scoring only what is new).
# `seed`: Optuna's sampler seed. The base arm at the scoring sampler samples what the evaluate stage sampled: it takes
# those samples over (each part checked to be the same samples) instead of drawing them again.
INPUTS = TRIAL_INPUTS | StageInputs(fields=("seed", "tune"), reuses=("evaluate",))
# With tune.prior: diagnose the search's range is the diagnosis's bracket: a changed diagnosis reruns the search.
PRIOR_INPUTS = INPUTS | StageInputs(needs=("diagnose",))


def inputs_for(cfg: RunConfig) -> StageInputs:
    return PRIOR_INPUTS if cfg.tune.prior == "diagnose" else INPUTS


def run(section: TuneConfig, ctx: StageContext) -> Manifest:
    cfg = ctx.cfg
    base, finetuned = ctx.input_uri("base"), ctx.input_uri("finetune")
    trial_hash = fingerprint_inputs(cfg, "tune-trial", TRIAL_INPUTS, ctx.upstream_hashes)
    require_reference(cfg)
    rec = ctx.start()
    ensure_ray(cfg.ray)
    from tuning import (
        headline,  # imports Ray Tune: after ensure_ray has set the workers' environment
    )
    from tuning.search import flat, pick, run_search
    from tuning.trainable import MODEL, trial_dir

    reference = reference_statistics(cfg)  # computed once on the driver, read by every trial
    donors = tuple(m.uri(cfg.output, "samples") for m in ctx.reusable.values() if "samples" in m.outputs)
    prior = prior_of(cfg, ctx.upstream["diagnose"].metrics) if section.prior == "diagnose" else None
    trials = run_search(cfg, base, finetuned, rec.dir, trial_hash, f"tune-{ctx.config_hash}", ctx.tracker, ctx.run_id,
                        fresh=ctx.force, donors=donors, prior=tuple(prior["used"]) if prior and prior["used"] else None)
    best, best_base = pick(trials, "neon"), pick(trials, "base")
    if best is None:
        raise NeonError("tune: no Neon trial (w > 0) finished; check tune.space.w / tune.w_grid")
    best_model = headline.model_of(cfg, best, base, finetuned, rec.dir)
    for t in trials:  # keep only the best merged model (the others are one `neon-ray merge` away)
        if t is not best:
            storage.remove(storage.join(trial_dir(rec.dir, t["key"]), MODEL))
    final = None
    if section.final_seeds:
        base_trial = best_base or {"key": "w=0", "w": 0.0, "sampler": {}}  # unsearched sampler: the base at the scoring sampler
        final = {"base": headline.rescore(cfg, base_trial, base, rec.dir, reference, trial_hash),
                 "neon": headline.rescore(cfg, best, best_model, rec.dir, reference, trial_hash)}
        final["comparison"] = headline.compare(final["base"], final["neon"])
        final["second_space"] = headline.in_second_space(cfg, final, rec.dir, trial_hash)
    rows = [flat(t) for t in trials]
    top = flat(best)
    rec.inputs = {"base_checkpoint": base, "finetuned": finetuned, "reference": reference_uri(cfg)}
    rec.outputs = {"best_model": best_model, "best_samples": storage.resolve(cfg.output, top["samples"]),
                   "trials": storage.join(rec.dir, "trials")}
    rec.metrics = {"best_w": best["w"], "best_sampler": best["sampler"], "best_fid": top["fid"], "best_n": top["n"],
                   "best_class_consistency": top["class_consistency"],
                   "best_base": flat(best_base) if best_base else None, "trials": rows, "final": final,
                   "images_scored": sum(t["rungs"][-1]["n"] for t in trials)}
    if section.search == "line" and storage.exists(line := storage.join(rec.dir, "line.json")):
        rec.metrics["line"] = storage.read_json(line)  # the predicted FID(w) per sampler setting, the probes' measured FIDs
    rec.params = {"search": section.search, "scheduler": section.scheduler, "rungs": cfg.search_rungs(),
                  "space": {k: v.model_dump(exclude_none=True) for k, v in section.space.items()} or {"w": list(section.w_grid)},
                  "final_seeds": section.final_seeds, "max_concurrent_trials": section.max_concurrent_trials,
                  **({"prior": prior} if prior else {})}
    if ctx.tracker is not None and ctx.tracker.enabled:
        with tempfile.TemporaryDirectory(prefix="neon-trial-grids-") as tmp:
            grids = _trial_grids(cfg, rows, tmp)
            ctx.tracker.annotate_trials(ctx.run_id, rows, cfg.search_rungs(), best["key"], grids)
    if ctx.tracker is not None:
        settings = _settings(cfg, best)
        registered = ctx.tracker.register_model(
            ctx.run_id, best_model, spec_of(cfg), settings,
            {"w": best["w"], "fid": top["fid"], "sampler": settings.model_dump(mode="json"), "n_eval": top["n"],
             "feature_space": reference.feature_space, "config_hash": ctx.config_hash, "codec": dataset_of(cfg).kind},
            trial_key=best["key"])
        if registered:
            rec.params |= {"registered_model": registered["name"], "registered_version": registered["version"],
                           "registered_alias": registered["alias"], "registered_trial_run": registered["trial_run_id"],
                           "registered_uri": registered["path"]}
    return rec.finish()


def prior_of(cfg: RunConfig, diagnosis: dict) -> dict:
    """The w range the search starts from under tune.prior: diagnose: the diagnosed bracket (an open one reaching at
    least the configured range's far end), clipped to the allowed w (w > 0 unless tune.allow_negative_w; > 0 on a log
    scale), or None (`used`) when the diagnosis abstained or predicts only w the search may not take; `note` says
    which, in one line (logged)."""
    t = cfg.tune
    w = t.w_dimension()
    lo, hi = (float(x) for x in diagnosis["bracket"])
    configured = (w.low, w.high) if w.is_range else (min(w.choice), max(w.choice))
    positive_only = not t.allow_negative_w or w.scale == "log"
    if diagnosis.get("bracket_open"):  # the loss still fell at the last w point: reach at least as far as the configured range
        lo, hi = (lo, max(hi, configured[1])) if diagnosis["sign"] > 0 else (min(lo, configured[0]), hi)
    used, note = (lo, hi), f"tune.prior: searching w over the diagnosed bracket [{lo:g}, {hi:g}] (configured: [{configured[0]:g}, {configured[1]:g}])"
    if t.search in ("grid", "line"):
        used, note = None, f"tune.prior: the {t.search} searcher searches as configured (the prior steers bracket and optuna only)"
    elif diagnosis["sign"] == 0:
        used, note = None, "tune.prior: the diagnosis abstained (g·Δ within two standard errors of 0); searching the configured range"
    elif positive_only and hi <= 0:
        used, note = None, (f"tune.prior: the diagnosis predicts w < 0 (bracket [{lo:g}, {hi:g}]) but the search takes only w > 0 "
                            "(tune.allow_negative_w: false); searching the configured range")
    elif positive_only and lo <= 0:
        floor = configured[0] if 0 < configured[0] < hi else hi / 4
        used, note = (floor, hi), f"tune.prior: the diagnosed bracket [{lo:g}, {hi:g}] clipped to the allowed w > 0: [{floor:g}, {hi:g}]"
    log.info(note)
    return {"source": "diagnose", "bracket": [float(x) for x in diagnosis["bracket"]], "sign": diagnosis["sign"],
            "used": list(used) if used else None, "note": note}


def _trial_grids(cfg: RunConfig, rows: list[dict], tmp: str) -> dict[str, str]:
    """A small grid of each trial's first samples (the same seeds and labels for every trial), for its MLflow run."""
    from ..report import save_sample_grid

    kind = dataset_of(cfg).kind
    grids = {}
    for i, row in enumerate(rows):
        path = os.path.join(tmp, f"trial-{i}", TRIAL_GRID)
        os.makedirs(os.path.dirname(path))
        grids[row["key"]] = save_sample_grid(storage.resolve(cfg.output, row["samples"]), path,
                                             f"{row['key']}  FID {row['fid']:.4g} (n = {row['n']})", kind=kind)
    return grids


def _settings(cfg: RunConfig, trial: dict):
    from tuning.spaces import settings_of

    return settings_of(cfg, {"w": trial["w"], **trial["sampler"]})
