"""Stage `evaluate`: FID, precision/recall, class consistency and the real-vs-real floor of θ_base
(or of `neon-ray evaluate --checkpoint FILE`), through neon_ray.scoring."""

from __future__ import annotations

from ..config import EvaluateConfig
from ..context import StageContext
from ..inputs import BASE, StageInputs
from ..manifest import Manifest
from ..runtime.run_model import load_model, spec_of
from ..runtime.cluster import ensure_ray
from ..scoring import extractor_fingerprint, reference_statistics, reference_uri, require_reference, score_checkpoint

SCORES = ("fid", "precision", "recall", "fid_floor", "class_consistency", "n", "sample_seconds")


INPUTS = StageInputs(fields=("model.family", "model.preset", "model.options", "evaluate"),
                     derived=("dataset", "data_spec", "scoring_sampler", "extractor"), needs=(BASE,))


def run(section: EvaluateConfig, ctx: StageContext) -> Manifest:
    cfg, target = ctx.cfg, ctx.input_uri("base")
    load_model(spec_of(cfg), target)  # fail fast: unreadable or mismatched checkpoint
    require_reference(cfg)
    rec = ctx.start()
    ensure_ray(cfg.ray)
    reference = reference_statistics(cfg)
    scores = score_checkpoint(cfg, target, rec.dir, reference, fresh=ctx.force)
    rec.inputs = {"checkpoint": target, "reference": reference_uri(cfg)}
    rec.outputs = {"samples": scores["samples"]}
    rec.metrics = {k: scores[k] for k in SCORES}
    rec.params = {"extractor": extractor_fingerprint(cfg), "feature_space": reference.feature_space,
                  "num_samples": section.num_samples, "eval_seed": section.seed, "prc_k": section.prc_k,
                  **{f"sampler.{k}": v for k, v in cfg.scoring_sampler().model_dump().items()}}
    return rec.finish()
