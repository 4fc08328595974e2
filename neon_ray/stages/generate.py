"""Stage `generate`: sample the synthetic set S from θ_base with its usual sampler (incl. CFG) → Parquet.

Class-balanced labels (image i has class i mod K) and per-image seeds keyed by (seed, "synthetic", i).
"""

from __future__ import annotations

from .. import storage
from ..config import GenerateConfig
from ..context import StageContext
from ..inputs import BASE, StageInputs
from ..manifest import Manifest
from ..runtime.run_model import dataset_of, load_model, spec_of
from ..runtime.cluster import ensure_ray
from ..runtime.sampling import sample_to_parquet

STREAM = "synthetic"


INPUTS = StageInputs(fields=("seed", "model.family", "model.preset", "model.options", "sampler", "generate"), derived=("data_spec",),
                     needs=(BASE,))


def run(section: GenerateConfig, ctx: StageContext) -> Manifest:
    cfg, base = ctx.cfg, ctx.input_uri("base")
    spec = spec_of(cfg)
    load_model(spec, base)  # fail fast on the driver: unreadable or mismatched checkpoint
    rec = ctx.start()
    ensure_ray(cfg.ray)
    info = sample_to_parquet(spec, base, cfg.sampler, dataset_of(cfg).kind, section.num_samples, cfg.seed, STREAM,
                             storage.join(rec.dir, "samples"), section, fresh=ctx.force)
    rec.inputs = {"base_checkpoint": base}
    rec.outputs = {"samples": info["uri"]}
    rec.metrics = {"n_synthetic": info["n"], "images_per_second": info["images_per_second"], "reused_items": info["reused_items"]}
    rec.params = {"seed": cfg.seed, "stream": STREAM, "actors": section.actors,
                  **{f"sampler.{k}": v for k, v in cfg.sampler.model_dump().items()}}
    return rec.finish()
