"""Stage `finetune`: θ_ft = a short fine-tune of θ_base on S with the model's own loss (Ray Train + DeepSpeed).

The workers run runtime/finetune_loop.py; DeepSpeed's configuration, checkpoints and the fp32 consolidation
of θ_ft (the merge needs fp32: θ_ft − θ_base is far below bf16 resolution) are runtime/deepspeed.py.
"""

from __future__ import annotations

import logging
import math

from .. import storage
from ..config import FinetuneConfig
from ..context import StageContext
from ..errors import NeonError
from ..inputs import BASE, StageInputs
from ..manifest import Manifest
from ..runtime.run_model import dataset_of, spec_of, train_images_of
from ..runtime.cluster import ensure_ray, resolve_use_gpu
from ..runtime.deepspeed import OUT_OF_MEMORY_HINT, check_deepspeed, network_facts

log = logging.getLogger("neon_ray")
MODEL = "model.safetensors"


INPUTS = StageInputs(fields=("seed", "model.family", "model.preset", "model.options", "model.base_train_images", "finetune"),
                     derived=("data_spec",), needs=(BASE, "generate"))


def plan(f: FinetuneConfig) -> dict:
    steps = max(1, math.ceil(f.budget_images / f.batch_size))
    return {"steps": steps, "micro_batch": f.batch_size // f.workers, "warmup_steps": math.ceil(f.warmup_images / f.batch_size),
            "images": steps * f.batch_size}


def run(f: FinetuneConfig, ctx: StageContext) -> Manifest:
    cfg = ctx.cfg
    base, samples = ctx.input_uri("base"), ctx.input_uri("generate", "samples")
    p = plan(f)
    check_deepspeed(f.zero_stage)
    rec = ctx.start()
    ensure_ray(cfg.ray)

    from ..runtime.finetune_loop import finetune_loop
    from ..runtime.samplesets import read_samples
    from ..runtime.ray_train import fit, host_memory_env, torch_trainer

    codec = dataset_of(cfg).codec
    n = read_samples(samples, columns=["index"]).num_rows
    if n == 0:
        raise NeonError(f"empty synthetic set: {storage.redact_uri(samples)} holds no images")
    if n < f.batch_size:
        raise NeonError(f"finetune.batch_size: {f.batch_size} exceeds the synthetic set's {n} images")
    parameters = network_facts(spec_of(cfg), f.activation_checkpointing)  # a network that cannot checkpoint: said here
    use_gpu = resolve_use_gpu(f.use_gpu)
    trainer = torch_trainer(
        finetune_loop,
        {"spec": spec_of(cfg), "codec": codec.kind, "section": f.model_dump(), "seed": cfg.seed, "base": base, "samples": samples,
         "stage_dir": rec.dir, "model_uri": storage.join(rec.dir, MODEL), "plan": p, "use_gpu": use_gpu, "config_hash": ctx.config_hash},
        f, f"finetune-{ctx.config_hash}", rec.dir, fresh=ctx.force, use_gpu=use_gpu,
        worker_env=None if use_gpu else host_memory_env(parameters),
        reports_to=ctx.tracker.live_metrics(ctx.run_id) if ctx.tracker is not None else None)
    fit(trainer, "finetune", f.max_failures, out_of_memory=OUT_OF_MEMORY_HINT)
    summary = storage.read_json(storage.join(rec.dir, "train_summary.json"))
    base_images = train_images_of(base, cfg.model.base_train_images)
    rec.inputs = {"base_checkpoint": base, "samples": samples}
    rec.outputs = {"model": storage.join(rec.dir, MODEL), "history": storage.join(rec.dir, "history.json")}
    rec.metrics = {
        "finetune_images": p["images"],
        "steps": p["steps"],
        "final_loss": summary["final_loss"],
        "initial_loss": summary["initial_loss"],
        "images_per_second": summary["images_per_second"],
        "base_train_images": base_images,
        "extra_compute_fraction": (p["images"] / base_images) if base_images else None,
    }
    rec.params = {"zero_stage": f.zero_stage, "offload_optimizer": f.offload_optimizer,
                  "activation_checkpointing": f.activation_checkpointing, "bf16": f.bf16, "lr": f.lr, "batch_size": f.batch_size, "workers": f.workers,
                  "warmup_images": f.warmup_images, "budget_images": f.budget_images, "use_gpu": use_gpu}
    return rec.finish()
