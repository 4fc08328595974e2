"""Stage `evaluate`: FID of a checkpoint against cached reference statistics of the real split.

Samples come from the same Ray Data path as `generate` (stream "eval", seeds keyed by evaluate.seed,
identical for every model scored: common random numbers); features come from a torch-fidelity
extractor, merged exactly across shards.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pyarrow as pa

from .. import storage
from ..cluster import ensure_ray
from ..config import RunConfig, fingerprint
from ..errors import NeonError
from ..fid import extractors
from ..fid.distributed import feature_statistics
from ..fid.stats import Statistics, frechet_distance
from ..imageio import encode_png
from ..manifest import start, up_to_date
from ..sampling import sample_to_parquet
from .common import base_checkpoint_uri, base_identity, checkpoint_identity, dataset_of

log = logging.getLogger("neon_ray")
STAGE = "evaluate"
STREAM = "eval"


def extractor_fingerprint(cfg: RunConfig) -> str:
    return extractors.fingerprint(cfg.evaluate.extractor, cfg.evaluate.extractor_weights)


def reference_uri(cfg: RunConfig) -> str:
    root = cfg.evaluate.reference_cache or storage.join(cfg.output, "reference")
    name = re.sub(r"[^A-Za-z0-9_.@-]", "_", f"{cfg.data.name}-{cfg.evaluate.reference_split}-{extractor_fingerprint(cfg)}")
    return storage.join(root, f"{name}.npz")


def blocks_of(table: pa.Table, rows: int):
    """A Ray Dataset of `rows`-row blocks made on the caller: no Ray Data tasks (each would ask for a
    whole CPU, which a busy small cluster such as a running Tune trial cannot give)."""
    import ray

    return ray.data.from_arrow([table.slice(i, rows) for i in range(0, table.num_rows, rows)])


def reference_statistics(cfg: RunConfig) -> Statistics:
    """Statistics of the real reference split: computed once, then read from the cache."""
    uri = reference_uri(cfg)
    fp = extractor_fingerprint(cfg)
    if storage.exists(uri):
        stats = Statistics.from_bytes(storage.read_bytes(uri), uri)
        if stats.extractor == fp:
            return stats
        log.info("cached reference statistics %s were made with %s; recomputing", uri, stats.extractor)
    import ray

    ensure_ray(cfg.ray)
    images, labels = dataset_of(cfg).load(cfg.evaluate.reference_split)
    table = pa.table({"png": [encode_png(im) for im in images], "label": labels.astype(np.int64)})
    ds = blocks_of(table, cfg.evaluate.feature_batch_size)
    stats, consistency = feature_statistics(ds, cfg.evaluate.extractor, cfg.evaluate.extractor_weights, fp, cfg.generate,
                                            cfg.evaluate.feature_batch_size)
    storage.write_bytes_atomic(uri, stats.to_bytes())
    log.info("reference statistics of %s/%s (%d images, classifier agreement %.4f) → %s",
             cfg.data.name, cfg.evaluate.reference_split, stats.n, consistency or float("nan"), uri)
    return stats


def score_samples(cfg: RunConfig, samples_uri: str, reference: Statistics) -> dict:
    """FID (and class consistency) of a Parquet sample set.

    The set is read with pyarrow and handed to Ray Data as PNG bytes in blocks (see `blocks_of`).
    """
    from ..sampling import read_samples

    table = read_samples(samples_uri, columns=["index", "png", "label"]).select(["png", "label"])
    if table.num_rows == 0:
        raise NeonError(f"empty sample set: {samples_uri} holds no images")
    ds = blocks_of(table, cfg.evaluate.feature_batch_size)
    stats, consistency = feature_statistics(ds, cfg.evaluate.extractor, cfg.evaluate.extractor_weights, reference.extractor,
                                            cfg.generate, cfg.evaluate.feature_batch_size)
    return {"fid": frechet_distance(stats, reference), "class_consistency": consistency, "n": stats.n}


def score_checkpoint(cfg: RunConfig, checkpoint: str, dest_dir: str, reference: Statistics, settings: dict | None = None) -> dict:
    """Sample the evaluation set of `checkpoint` into `dest_dir/samples` and score it."""
    info = sample_to_parquet(cfg, checkpoint, cfg.evaluate.num_samples, cfg.evaluate.seed, STREAM,
                             storage.join(dest_dir, "samples"), settings=settings)
    scores = score_samples(cfg, info["uri"], reference)
    return scores | {"sample_seconds": info["seconds"], "samples": info["uri"]}


def config_hash(cfg: RunConfig, checkpoint: str | None) -> str:
    model = checkpoint_identity(checkpoint) if checkpoint else base_identity(cfg)
    return fingerprint(STAGE, model, cfg.data.name, cfg.model.family, cfg.model.preset, cfg.model.options, cfg.sampler,
                       cfg.evaluate, extractor_fingerprint(cfg), cfg.generate.bf16)


def evaluate(cfg: RunConfig, checkpoint: str | None = None, force: bool = False) -> dict:
    target = checkpoint or base_checkpoint_uri(cfg)
    h = config_hash(cfg, checkpoint)
    if (done := up_to_date(STAGE, cfg.output, h, force)) is not None:
        return done
    from .common import load_model

    load_model(cfg, target)  # fail fast: unreadable or mismatched checkpoint
    if cfg.evaluate.num_samples < 2:
        raise NeonError("evaluate.num_samples: FID needs at least 2 samples")
    rec = start(STAGE, cfg.output, h)
    ensure_ray(cfg.ray)
    reference = reference_statistics(cfg)
    scores = score_checkpoint(cfg, target, rec.dir, reference)
    rec.inputs = {"checkpoint": target, "reference": reference_uri(cfg)}
    rec.outputs = {"samples": scores["samples"]}
    rec.metrics = {"fid": scores["fid"], "class_consistency": scores["class_consistency"], "n": scores["n"],
                   "sample_seconds": scores["sample_seconds"]}
    rec.params = {"extractor": reference.extractor, "num_samples": cfg.evaluate.num_samples, "eval_seed": cfg.evaluate.seed,
                  **{f"sampler.{k}": v for k, v in cfg.sampler.items()}}
    return rec.finish()
