"""Stage `merge`: θ_neon = θ_base − w·(θ_ft − θ_base) as safetensors (see neon_ray.merge)."""

from __future__ import annotations

from .. import storage
from ..config import RunConfig, check_w, fingerprint
from ..manifest import start, up_to_date
from ..merge import merge_uris
from .common import base_checkpoint_uri, checkpoint_identity, require_stage

STAGE = "merge"


def merge_stage(cfg: RunConfig, base: str | None = None, finetuned: str | None = None, w: float | None = None,
                out: str | None = None, force: bool = False) -> dict:
    w = cfg.merge.w if w is None else w
    check_w(w, "merge.w", cfg.merge.allow_negative_w)
    base = base or base_checkpoint_uri(cfg)
    finetuned = finetuned or require_stage(cfg, "finetune")["outputs"]["model"]
    out = out or storage.join(cfg.output, STAGE, "model.safetensors")
    h = fingerprint(STAGE, checkpoint_identity(base), checkpoint_identity(finetuned), w, out)
    if (done := up_to_date(STAGE, cfg.output, h, force)) is not None:
        return done
    rec = start(STAGE, cfg.output, h)
    info = merge_uris(base, finetuned, out, w, cfg.merge.allow_negative_w)
    rec.inputs = {"base": base, "finetuned": finetuned}
    rec.outputs = {"model": out}
    rec.metrics = info
    rec.params = {"w": w}
    return rec.finish()
