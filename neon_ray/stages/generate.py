"""Stage `generate`: sample the synthetic set S from θ_base with its usual sampler (incl. CFG) → Parquet.

Class-balanced labels (image i has class i mod K) and per-image seeds keyed by (seed, "synthetic", i).
"""

from __future__ import annotations

from .. import storage
from ..cluster import ensure_ray
from ..config import RunConfig, fingerprint
from ..manifest import start, up_to_date
from ..sampling import sample_to_parquet
from .common import base_checkpoint_uri, base_identity

STAGE = "generate"
STREAM = "synthetic"


def config_hash(cfg: RunConfig) -> str:
    g = cfg.generate
    return fingerprint(STAGE, cfg.seed, base_identity(cfg), cfg.data.name, cfg.model.family, cfg.model.preset,
                       cfg.model.options, cfg.sampler, g.num_samples, g.batch_size, g.bf16)


def generate(cfg: RunConfig, force: bool = False) -> dict:
    base = base_checkpoint_uri(cfg)
    h = config_hash(cfg)
    if (done := up_to_date(STAGE, cfg.output, h, force)) is not None:
        return done
    from .common import load_model

    load_model(cfg, base)  # fail fast on the driver: unreadable or mismatched checkpoint
    rec = start(STAGE, cfg.output, h)
    ensure_ray(cfg.ray)
    info = sample_to_parquet(cfg, base, cfg.generate.num_samples, cfg.seed, STREAM, storage.join(rec.dir, "samples"))
    rec.inputs = {"base_checkpoint": base}
    rec.outputs = {"samples": info["uri"]}
    rec.metrics = {"n_synthetic": info["n"], "images_per_second": info["images_per_second"]}
    rec.params = {"seed": cfg.seed, "stream": STREAM, "actors": cfg.generate.actors, **{f"sampler.{k}": v for k, v in cfg.sampler.items()}}
    return rec.finish()
