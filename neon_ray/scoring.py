"""Scoring, shared by the evaluate and tune stages and the `ref-stats` / `fid` commands: reference
statistics, the real-vs-real floor, and FID / precision / recall / class consistency of a sample set or
a checkpoint.

A checkpoint's evaluation set comes from the same Ray Data path as `generate` (stream "eval", seeds
keyed by evaluate.seed, identical for every model scored: common random numbers); features come from
a torch-fidelity extractor over an actor pool, merged exactly across shards. The reference statistics
(and a capped, seeded sample of reference features for precision/recall) are computed once and
cached under a name that says what they are of (`reference_identity`: the dataset's identity and split, or
the reference source's content), and checked against it on reuse; the floor, FID of n real images against
the same reference, is cached per (n, reference).
Published ADM/EDM `.npz` files (`mu`, `sigma`) can be imported as the reference, tagged with the
feature space they were made in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time

import numpy as np

from . import storage
from .config import RunConfig
from .errors import NeonError
from .fid import extractors
from .fid.extractors import INCEPTION_SPACE
from .fid.prc import keep_mask, knn_radii, precision_recall
from .fid.stats import Statistics, features_from_bytes, features_to_bytes, frechet_distance, import_published
from .runtime.run_model import dataset_of, spec_of
from .runtime.cluster import ensure_ray
from .runtime.features import extract
from .runtime.samplesets import SampleSet, concat_sets, encoded_set, open_samples
from .runtime.sampling import sample_to_parquet

log = logging.getLogger("neon_ray")
STREAM = "eval"
IMPORTED = "imported"  # Statistics.extractor of published reference files (no features kept)
SPACE_ALIASES = {"inception": INCEPTION_SPACE}
SPACE_DIMS = {INCEPTION_SPACE: 2048}


def extractor_fingerprint(cfg: RunConfig) -> str:
    return extractors.fingerprint(cfg.evaluate.extractor, cfg.evaluate.extractor_weights)


def extractor_space(cfg: RunConfig) -> str:
    return extractors.feature_space(cfg.evaluate.extractor, cfg.evaluate.extractor_weights)


def reference_identity(cfg: RunConfig) -> dict:
    """What the reference statistics are of: the reference source's content, or the dataset's identity and split."""
    ev = cfg.evaluate
    if ev.reference_source:
        return {"source": storage.redact_uri(ev.reference_source), "content": storage.content_identity(ev.reference_source)}
    return {"dataset": dataset_of(cfg).identity(), "split": ev.reference_split}


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]


def reference_uri(cfg: RunConfig) -> str:
    """`evaluate.reference`, else a cache file named by what the statistics are of and which extractor made them."""
    ev = cfg.evaluate
    if ev.reference:
        return ev.reference
    what = os.path.basename(ev.reference_source.rstrip("/")) if ev.reference_source else f"{cfg.data.name}-{ev.reference_split}"
    name = re.sub(r"[^A-Za-z0-9_.@-]", "_", f"{what}-{_digest(reference_identity(cfg))}-{extractor_fingerprint(cfg)}")
    return storage.join(ev.reference_cache or storage.join(cfg.output, "reference"), f"{name}.npz")


def sidecar(stats_uri: str, suffix: str) -> str:
    """A file beside the statistics: `ref.npz` → `ref.features.npz`, `ref.floor-….json`."""
    return f"{stats_uri[:-4] if stats_uri.endswith('.npz') else stats_uri}.{suffix}"


def dataset_split(cfg: RunConfig, split: str, n: int | None = None, seed: int = 0) -> SampleSet | None:
    """A dataset split (all of it, or a seeded n of it: None when it has fewer) as encoded samples."""
    ds = dataset_of(cfg)
    samples, labels = ds.load(split)
    if n is not None:
        if len(samples) < n:
            return None
        idx = np.sort(np.random.default_rng(seed).choice(len(samples), size=n, replace=False))
        samples, labels = samples[idx], labels[idx]
    return encoded_set(samples, labels, ds.codec, f"{cfg.data.name}/{split}")


def features_of(cfg: RunConfig, samples: SampleSet, keep_cap: int = 0, num_shards: int | None = None):
    """The sharded feature pass over `samples` with the configured extractor (inputs checked first)."""
    ev = cfg.evaluate
    extractors.get_extractor(ev.extractor).check_input(samples.shape, samples.source, samples.kind)
    keep = keep_mask(samples.n, keep_cap, ev.seed) if keep_cap else None
    weights = extractors.get_extractor(ev.extractor).weights(ev.extractor_weights)  # resolved here: actors run elsewhere
    return extract(samples, ev.extractor, weights, extractor_space(cfg), extractor_fingerprint(cfg), ev,
                   ev.feature_batch_size, num_shards=num_shards, keep=keep)


# ----------------------------------------------------------------------------------------------
# Reference statistics


def compute_reference(cfg: RunConfig, num_shards: int | None = None) -> Statistics:
    """Statistics of `evaluate.reference_source` (or the dataset's reference split), written to `reference_uri`."""
    ev = cfg.evaluate
    ensure_ray(cfg.ray)
    samples = open_samples(ev.reference_source) if ev.reference_source else dataset_split(cfg, ev.reference_split)
    result = features_of(cfg, samples, keep_cap=ev.prc_num_reference, num_shards=num_shards)
    uri = reference_uri(cfg)
    result.stats.identity = json.dumps(reference_identity(cfg), sort_keys=True, default=str)
    radii = knn_radii(result.features, ev.prc_k) if ev.prc and len(result.features) > ev.prc_k else None  # once, not per score
    storage.write_bytes_atomic(sidecar(uri, "features.npz"),
                               features_to_bytes(result.features, result.stats.feature_space, radii, ev.prc_k))
    storage.write_bytes_atomic(uri, result.stats.to_bytes())  # last: its presence means both are complete
    agreement = "" if result.consistency is None else f", classifier agreement {result.consistency:.4f}"
    log.info("reference statistics of %s (%d samples%s) → %s", samples.source, result.stats.n, agreement, uri)
    return result.stats


def cached_reference(cfg: RunConfig) -> Statistics | None:
    """The reference at `reference_uri` when it is current for this config, else None."""
    uri, space = reference_uri(cfg), extractor_space(cfg)
    if not storage.exists(uri):
        return None
    stats = Statistics.from_bytes(storage.read_bytes(uri), uri)
    if stats.feature_space != space:
        if cfg.evaluate.reference:
            raise NeonError(f"evaluate.reference: {uri} is in feature space {stats.feature_space}, but evaluate.extractor "
                            f"{cfg.evaluate.extractor} computes {space}")
        log.info("cached reference statistics %s are in %s; recomputing", uri, stats.feature_space)
        return None
    if stats.identity and not _same_source(cfg, json.loads(stats.identity), uri):
        return None
    if cfg.evaluate.prc and stats.extractor != IMPORTED and not storage.exists(sidecar(uri, "features.npz")):
        log.info("cached reference statistics %s have no feature sample for precision/recall; recomputing", uri)
        return None
    return stats


def _same_source(cfg: RunConfig, stored: dict, uri: str) -> bool:
    """Whether statistics made from `stored` (a reference_identity) may stand for this config's reference.

    A cache file that was made from other data is recomputed. A configured `evaluate.reference` made from another
    dataset, split, options or source is an error; one whose files only changed on disk (copied, touched) is used,
    with a warning."""
    current = json.loads(json.dumps(reference_identity(cfg), default=str))  # as stored: tuples become lists
    if stored == current:
        return True
    if not cfg.evaluate.reference:
        log.info("cached reference statistics %s were computed from other data; recomputing", uri)
        return False
    if _without_content(stored) != _without_content(current):
        raise NeonError(f"evaluate.reference: {storage.redact_uri(uri)} was computed from {_describe(stored)}, but this config's "
                        f"reference is {_describe(current)}; recompute it with `neon-ray ref-stats --force` or unset evaluate.reference")
    log.warning("evaluate.reference: the files it was computed from changed on disk since (%s); using it as configured", _describe(current))
    return True


def _without_content(identity: dict) -> dict:
    return {k: _without_content(v) if isinstance(v, dict) else v for k, v in identity.items() if k != "content"}


def _describe(identity: dict) -> str:
    return json.dumps(_without_content(identity), sort_keys=True)


def require_reference(cfg: RunConfig) -> None:
    """A configured `evaluate.reference` must exist: it is never computed silently into a path the user named."""
    if cfg.evaluate.reference and not storage.exists(cfg.evaluate.reference):
        raise NeonError(f"evaluate.reference: file not found: {storage.redact_uri(cfg.evaluate.reference)} (make it with "
                        "`neon-ray ref-stats`, which computes or imports it, or unset it to use the cache)")


def reference_statistics(cfg: RunConfig) -> Statistics:
    """Statistics of the reference: read from `reference_uri` when current, else computed once and cached."""
    require_reference(cfg)
    return cached_reference(cfg) or compute_reference(cfg)


def reference_features(cfg: RunConfig, reference: Statistics) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(features, their k-NN radii for evaluate.prc_k or None) of the cached reference sample; None for imported statistics."""
    uri = sidecar(reference_uri(cfg), "features.npz")
    if reference.extractor == IMPORTED or not storage.exists(uri):
        log.warning("no reference features beside %s (imported statistics): precision/recall skipped; "
                    "compute the reference from images with `neon-ray ref-stats` to get them", reference_uri(cfg))
        return None
    features, radii, k = features_from_bytes(storage.read_bytes(uri), uri, reference.feature_space)
    return features, radii if k == cfg.evaluate.prc_k else None


# ----------------------------------------------------------------------------------------------
# Scoring


def fid_floor(cfg: RunConfig, n: int, reference: Statistics) -> float | None:
    """FID of n real images (the split other than evaluate.reference_split) against the reference: the FID a
    perfect model would get at this sample count. FID differences below it are noise. Cached per (n, reference)."""
    split = "train" if cfg.evaluate.reference_split == "test" else "test"
    digest = hashlib.sha256(reference.mu.tobytes() + reference.sigma.tobytes()).hexdigest()[:16]
    uri = sidecar(reference_uri(cfg), f"floor-{split}-n{n}-seed{cfg.evaluate.seed}.json")
    if storage.exists(uri):
        cached = storage.read_json(uri)
        if cached.get("reference_digest") == digest:
            return cached["fid_floor"]
    real = dataset_split(cfg, split, n, cfg.evaluate.seed)
    if real is None:
        log.warning("fid_floor skipped: %s/%s has fewer samples than the %d scored", cfg.data.name, split, n)
        return None
    floor = frechet_distance(features_of(cfg, real).stats, reference)
    storage.write_json_atomic(uri, {"fid_floor": floor, "n": n, "split": split, "seed": cfg.evaluate.seed,
                                    "feature_space": reference.feature_space, "reference_digest": digest})
    log.info("real-vs-real FID floor at n=%d (%s/%s vs reference): %.4f", n, cfg.data.name, split, floor)
    return floor


def score_set(cfg: RunConfig, samples: SampleSet, reference: Statistics, num_shards: int | None = None) -> dict:
    """FID, precision/recall, class consistency and the FID floor of a sample set against the reference."""
    return scores_of(cfg, scored_features(cfg, samples, num_shards), reference)


def scored_features(cfg: RunConfig, samples: SampleSet, num_shards: int | None = None):
    """The feature pass of a set to score (with the seeded precision/recall sample of its features)."""
    ev = cfg.evaluate
    return features_of(cfg, samples, keep_cap=ev.prc_num_samples if ev.prc else 0, num_shards=num_shards)


def scores_of(cfg: RunConfig, result, reference: Statistics) -> dict:
    """Scores of a feature pass against the reference."""
    ev = cfg.evaluate
    scores = {"fid": frechet_distance(result.stats, reference), "precision": None, "recall": None,
              "class_consistency": result.consistency, "n": result.stats.n, "feature_seconds": round(result.seconds, 2)}
    if ev.prc and (real := reference_features(cfg, reference)) is not None:
        scores |= precision_recall(result.features, real[0], ev.prc_k, real_radii=real[1])
    scores["fid_floor"] = fid_floor(cfg, result.stats.n, reference) if ev.floor else None
    return scores


def score_samples(cfg: RunConfig, samples_uri: str, reference: Statistics, num_shards: int | None = None) -> dict:
    """Scores of a Parquet sample set (from `generate`) or an image folder."""
    return score_set(cfg, open_samples(samples_uri), reference, num_shards)


def score_checkpoint(cfg: RunConfig, checkpoint: str, dest_dir: str, reference: Statistics, settings=None, fresh: bool = False) -> dict:
    """Sample the evaluation set of `checkpoint` into `dest_dir/samples` (with `settings`, default the scoring
    sampler; parts of an interrupted earlier call are reused unless `fresh`) and score it: one rung of n."""
    return score_rung(cfg, checkpoint, dest_dir, reference, settings or cfg.scoring_sampler(), [cfg.evaluate.num_samples], 0,
                      fresh=fresh)


def increment_dir(dest_dir: str, first: int, n: int) -> str:
    """Where samples first..n-1 of a set grown rung by rung live: the first rung in `samples`, each later one beside it."""
    return storage.join(dest_dir, "samples" if first == 0 else f"samples+{first}-{n}")


def score_rung(cfg: RunConfig, checkpoint: str, dest_dir: str, reference: Statistics, settings, rungs: list[int], k: int,
               seed: int | None = None, fresh: bool = False, donors: tuple[str, ...] = ()) -> dict:
    """Score the first `rungs[k]` evaluation samples of `checkpoint` (seed stream `seed`, default evaluate.seed);
    the scores come with the set's feature `statistics` (μ, Σ).

    Samples rungs[k-1]..rungs[k]-1 are added to those sampled for the earlier rungs (sample i depends only on
    (seed, stream, i), so the union equals a set sampled at once), then the union is scored. Increments left
    by an earlier call are reused (unless `fresh`), and so are those that a `donors` folder holds (sampling.sample_to_parquet).
    """
    seed = cfg.evaluate.seed if seed is None else seed
    parts, seconds = [], 0.0
    for j in range(k + 1):
        first = rungs[j - 1] if j else 0
        dest = increment_dir(dest_dir, first, rungs[j])
        info = sample_to_parquet(spec_of(cfg), checkpoint, settings, dataset_of(cfg).kind, rungs[j], seed, STREAM, dest,
                                 cfg.evaluate, first=first, fresh=fresh, donors=donors)
        parts.append(open_samples(info["uri"]))
        seconds += info["seconds"] if j == k else 0.0
    samples = parts[0] if k == 0 else concat_sets(parts, f"{dest_dir} (first {rungs[k]})")
    result = scored_features(cfg, samples)
    scores = scores_of(cfg, result, reference)
    return scores | {"sample_seconds": round(seconds, 2), "samples": increment_dir(dest_dir, 0, rungs[0]), "statistics": result.stats}


def score_uri(cfg: RunConfig, samples_uri: str, num_shards: int | None = None) -> dict:
    """`neon-ray fid`: a sample set against the configured reference statistics."""
    t0 = time.time()
    samples = open_samples(samples_uri)  # bad sets fail before Ray starts
    extractors.get_extractor(cfg.evaluate.extractor).check_input(samples.shape, samples.source, samples.kind)
    require_reference(cfg)
    reference = cached_reference(cfg)  # a reference in another feature space fails here, before Ray starts
    ensure_ray(cfg.ray)
    result = scored_features(cfg, samples, num_shards)  # first: the readers check every sample before a reference pass
    reference = reference or compute_reference(cfg, num_shards)
    scores = scores_of(cfg, result, reference)
    return scores | {"prc_k": cfg.evaluate.prc_k if scores["precision"] is not None else None,
                     "feature_space": reference.feature_space, "extractor": extractor_fingerprint(cfg),
                     "reference": reference_uri(cfg), "samples": samples_uri, "seconds": round(time.time() - t0, 2)}


def describe_scores(scores: dict) -> str:
    """One human line for the CLI."""
    def f(v, spec=".4f"):
        return "n/a" if v is None else format(v, spec)

    return (f"FID {f(scores['fid'])} (real-vs-real floor {f(scores.get('fid_floor'))}), precision {f(scores['precision'])}, "
            f"recall {f(scores['recall'])}, n={scores['n']} [{scores.get('feature_space')}]")


# ----------------------------------------------------------------------------------------------
# `neon-ray ref-stats`


def import_reference(cfg: RunConfig, path: str, feature_space: str = "inception") -> dict:
    """Tag a published statistics file with its feature space and store it as this config's reference."""
    space = SPACE_ALIASES.get(feature_space, feature_space)
    if not storage.exists(path):
        raise NeonError(f"--import: file not found: {path}")
    if space != extractor_space(cfg):
        raise NeonError(f"--import: {path} is in feature space {space}, but evaluate.extractor={cfg.evaluate.extractor} "
                        f"computes {extractor_space(cfg)}; set evaluate.extractor=inception-fid-helper (or the extractor of that space)")
    stats = import_published(storage.read_bytes(path), path, space, SPACE_DIMS.get(space))
    uri = reference_uri(cfg)
    storage.remove(sidecar(uri, "features.npz"))  # a previous computed reference's features are not of this file
    storage.write_bytes_atomic(uri, stats.to_bytes())
    log.info("imported %s (%d-d, feature space %s) → %s", path, len(stats.mu), space, uri)
    return reference_summary(cfg, stats, "imported")


def ref_stats(cfg: RunConfig, import_path: str | None = None, feature_space: str = "inception", num_shards: int | None = None,
              force: bool = False) -> dict:
    """Compute the reference statistics once (or import a published file) at the configured reference location."""
    t0 = time.time()
    if import_path:
        return import_reference(cfg, import_path, feature_space) | {"seconds": round(time.time() - t0, 2)}
    stats = None if force else cached_reference(cfg)
    state = "up to date" if stats is not None else "computed"
    stats = stats or compute_reference(cfg, num_shards=num_shards)
    return reference_summary(cfg, stats, state) | {"seconds": round(time.time() - t0, 2)}


def reference_summary(cfg: RunConfig, stats: Statistics, state: str) -> dict:
    features = sidecar(reference_uri(cfg), "features.npz")
    return {"reference": reference_uri(cfg), "state": state, "n": stats.n, "dim": int(len(stats.mu)),
            "feature_space": stats.feature_space, "extractor": extractor_fingerprint(cfg), "source": stats.source,
            "features": features if storage.exists(features) else None}
