"""The honest headline: the best base and the best Neon rescored on evaluation seed sets the search never saw.

A search picks the lowest of many noisy FIDs, so the picked trial's own score is optimistic (selection
bias). Both picks (the base at its best sampler setting, Neon at its best (w, setting)) are therefore
rescored at the full n (evaluate.num_samples) with `tune.final_seeds` independent evaluation seed sets,
each its own (seed, stream) key, and reported as mean ± sd next to the real-vs-real floor at that n. A
difference within two standard errors of the two means is reported as inside the seed spread.

With `tune.headline_extractor` (e.g. the standard FID Inception) the pair is also scored in that feature
space: the first tune.headline_samples samples of each pick's first rescoring set (sample i depends only
on its seed, so they are an n-sample set themselves) against as many real reference images, next to the
floor of as many real images of the other split. The search may run on cheap features; the headline
does not rest on them alone (the 128-d Fashion-MNIST classifier exaggerates over-guidance).
"""

from __future__ import annotations

import math

import numpy as np

from neon_ray import storage
from neon_ray.config import RunConfig, fingerprint
from neon_ray.errors import NeonError
from neon_ray.fid import extractors
from neon_ray.fid.stats import Moments, Statistics, frechet_distance
from neon_ray.merge import merge_uris
from neon_ray.runtime.seeds import derive_seed
from neon_ray.runtime.samplesets import SampleSet, concat_sets, open_samples
from neon_ray.scoring import dataset_split, features_of, score_rung

from .spaces import W, settings_of
from .trainable import MODEL, config_hash_of, trial_dir

STREAM = "final-eval"  # root seeds of the rescoring sets: none equals the search's evaluate.seed stream


def final_seed(cfg: RunConfig, k: int) -> int:
    return derive_seed(cfg.evaluate.seed, STREAM, k)


def model_of(cfg: RunConfig, trial: dict, base: str, finetuned: str, tune_dir: str) -> str:
    """θ of a picked trial: θ_base for w = 0, else its merged model (merged again if an earlier search removed it)."""
    if trial["w"] == 0.0:
        return base
    model = storage.join(trial_dir(tune_dir, trial["key"]), MODEL)
    if not storage.exists(model):
        merge_uris(base, finetuned, model, trial["w"], allow_negative=cfg.tune.allow_negative_w)
    return model


def rescore(cfg: RunConfig, trial: dict, model: str, tune_dir: str, reference: Statistics, trial_hash: str) -> dict:
    """FID of `trial`'s config at evaluate.num_samples on each of tune.final_seeds fresh seed sets (cached per set)."""
    config = {W: trial["w"], **trial["sampler"]}
    settings = settings_of(cfg, config)
    n = cfg.evaluate.num_samples
    rows = []
    for k in range(cfg.tune.final_seeds):
        seed = final_seed(cfg, k)
        where = storage.join(tune_dir, "final", trial["key"], f"seed-{k}")
        uri = storage.join(where, "scores.json")
        expected = fingerprint("tune-final", config_hash_of(trial_hash, trial["key"], settings), n, seed)
        if storage.exists(uri) and (done := storage.read_json(uri)).get("config_hash") == expected:
            rows.append(done)
            continue
        scores = score_rung(cfg, model, where, reference, settings, [n], 0, seed=seed)
        done = {"config_hash": expected, "seed": seed, "samples": storage.relative(cfg.output, scores["samples"]),
                **{s: scores.get(s) for s in ("fid", "precision", "recall", "fid_floor", "class_consistency", "n")}}
        storage.write_json_atomic(uri, done)
        rows.append(done)
    return summarise(trial, rows)


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def summarise(trial: dict, rows: list[dict]) -> dict:
    fids = [float(r["fid"]) for r in rows]
    return {"key": trial["key"], "w": trial["w"], "sampler": trial["sampler"], "fids": fids,
            "fid_mean": float(np.mean(fids)), "fid_sd": float(np.std(fids, ddof=1)) if len(fids) > 1 else None,
            "n": rows[0]["n"], "seeds": [r["seed"] for r in rows], "samples": rows[0]["samples"],
            **{k: _mean(rows, k) for k in ("precision", "recall", "class_consistency", "fid_floor")}}


def compare(base: dict, neon: dict) -> dict:
    """Change in % of the means, and whether it lies inside the seed spread (within two standard errors)."""
    delta = neon["fid_mean"] - base["fid_mean"]
    k = len(base["fids"])
    if base["fid_sd"] is None or neon["fid_sd"] is None:
        within = None  # one seed set: no spread to compare with
    else:
        se = math.sqrt(base["fid_sd"] ** 2 / k + neon["fid_sd"] ** 2 / len(neon["fids"]))
        within = abs(delta) <= 2 * se
    floor = base.get("fid_floor")
    return {"change_pct": 100 * delta / base["fid_mean"] if base["fid_mean"] else None, "delta": delta,
            "within_seed_spread": within, "below_floor": None if floor is None else abs(delta) < floor}


def in_second_space(cfg: RunConfig, final: dict, tune_dir: str, trial_hash: str) -> dict | None:
    """FID of the rescored pair in tune.headline_extractor's feature space at tune.headline_samples, with its floor."""
    name, n = cfg.tune.headline_extractor, cfg.tune.headline_samples
    if not name:
        return None
    ev = cfg.evaluate.model_copy(update={"extractor": name, "extractor_weights": None, "prc": False})
    other = cfg.model_copy(update={"evaluate": ev})
    space = extractors.feature_space(name, None)
    # trial_hash: what the picks' samples and the real images were drawn from (models, sampler, dataset identity).
    expected = fingerprint("tune-second-space", space, n, ev.seed, final["base"]["samples"], final["neon"]["samples"], trial_hash)
    uri = storage.join(tune_dir, "final", f"second-space-{name}-n{n}.json")
    if storage.exists(uri) and (done := storage.read_json(uri)).get("config_hash") == expected:
        return done
    real_split = ev.reference_split
    other_split = "train" if real_split == "test" else "test"
    parts = {"reference": (_first(dataset_split(other, real_split, n, ev.seed), n), f"{cfg.data.name}/{real_split}"),
             "floor": (_first(dataset_split(other, other_split, n, ev.seed), n), f"{cfg.data.name}/{other_split}"),
             **{arm: (_first(open_samples(storage.resolve(cfg.output, final[arm]["samples"])), n), f"the {arm} pick's samples")
                for arm in ("base", "neon")}}
    for sset, what in parts.values():
        if sset is None or sset.n < n:
            raise NeonError(f"tune.headline_samples: {n} exceeds {what} ({0 if sset is None else sset.n} samples)")
    # One feature pass over the four sets (one actor-pool start-up), split back by row; two shards per actor so
    # that the slow extractor keeps every actor busy to the end whatever evaluate.feature_batch_size is.
    joined = concat_sets([sset for sset, _ in parts.values()], "second-space headline")
    feats = features_of(other, joined, keep_cap=joined.n, num_shards=min(joined.n, 2 * ev.actors)).features
    stats = {key: Statistics.from_moments(Moments.of(feats[i * n:(i + 1) * n]), space) for i, key in enumerate(parts)}
    fids = {key: frechet_distance(stats[key], stats["reference"]) for key in ("floor", "base", "neon")}
    floor = fids["floor"]
    done = {"config_hash": expected, "extractor": name, "feature_space": space, "n": n, "reference": f"{cfg.data.name}/{real_split} ({n} images)",
            "fid_base": fids["base"], "fid_neon": fids["neon"], "fid_floor": floor,
            "change_pct": 100 * (fids["neon"] - fids["base"]) / fids["base"] if fids["base"] else None}
    storage.write_json_atomic(uri, done)
    return done


def _first(samples: SampleSet | None, n: int) -> SampleSet | None:
    """The first n rows (lazy): sets of any origin then concatenate (labels are kept only when every set has them)."""
    return None if samples is None else samples.head(n)
