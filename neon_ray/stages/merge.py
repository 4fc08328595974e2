"""Stage `merge` (`neon-ray merge`): θ_neon = θ_base − w·(θ_ft − θ_base) as safetensors (see neon_ray.merge)."""

from __future__ import annotations

from .. import storage
from ..config import MergeConfig
from ..context import StageContext
from ..inputs import BASE, StageInputs
from ..manifest import Manifest
from ..merge import merge_uris

INPUTS = StageInputs(fields=("merge",), needs=(BASE, "finetune"))


def run(section: MergeConfig, ctx: StageContext) -> Manifest:
    base, finetuned = ctx.input_uri("base"), ctx.input_uri("finetune")
    out = ctx.options.get("out") or storage.join(ctx.stage_dir, "model.safetensors")
    rec = ctx.start()
    info = merge_uris(base, finetuned, out, section.w, section.allow_negative_w)
    rec.inputs = {"base": base, "finetuned": finetuned}
    rec.outputs = {"model": out}
    rec.metrics = info
    rec.params = {"w": section.w}
    return rec.finish()
