"""Stage `finetune`: θ_ft = a short fine-tune of θ_base on S with the model's own loss (Ray Train + DeepSpeed).

DeepSpeed runs the optimiser (ZeRO stage 0–3, optional bf16 with fp32 master weights). At the end
every rank takes part in gathering the full fp32 parameters, one tensor at a time, and rank 0 streams
θ_ft into one safetensors file: the merge needs fp32 θ_ft, since θ_ft − θ_base is far below bf16
resolution, and a large model's fp32 weights are never held whole beside its training state.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
from collections.abc import Iterator

import torch

from .. import storage
from ..config import FinetuneConfig
from ..context import StageContext
from ..errors import NeonError
from ..inputs import BASE, StageInputs
from ..manifest import Manifest
from ..models.checkpoint import save_checkpoint_streaming
from ..runtime.checkpoints import dataset_of, load_model, set_torch_threads, spec_of, train_images_of
from ..runtime.cluster import ensure_ray, resolve_use_gpu
from ..runtime.progress import Progress
from ..runtime.seeds import derive_seed
from ..runtime.train import check_deepspeed
from ..training import count_parameters, linear_warmup

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

    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..runtime.samplesets import read_samples
    from ..runtime.train import fit, fresh_start, host_memory_env, train_run_config

    codec = dataset_of(cfg).codec
    n = read_samples(samples, columns=["index"]).num_rows
    if n == 0:
        raise NeonError(f"empty synthetic set: {storage.redact_uri(samples)} holds no images")
    if n < f.batch_size:
        raise NeonError(f"finetune.batch_size: {f.batch_size} exceeds the synthetic set's {n} images")
    if f.activation_checkpointing:
        check_activation_checkpointing(spec_of(cfg))
    use_gpu = resolve_use_gpu(f.use_gpu)
    name, ray_dir = f"finetune-{ctx.config_hash}", storage.join(rec.dir, "ray")
    if ctx.force:
        fresh_start(ray_dir, name)
    trainer = TorchTrainer(
        _finetune_loop,
        train_loop_config={"spec": spec_of(cfg), "codec": codec.kind, "section": f.model_dump(), "seed": cfg.seed, "base": base,
                           "samples": samples, "stage_dir": rec.dir, "plan": p, "use_gpu": use_gpu, "config_hash": ctx.config_hash},
        scaling_config=ScalingConfig(num_workers=f.workers, use_gpu=use_gpu, resources_per_worker={"CPU": f.cpus_per_worker},
                                     placement_strategy=f.placement_strategy),
        run_config=train_run_config(name, ray_dir, f.max_failures,
                                    worker_env=None if use_gpu else host_memory_env(parameter_count(spec_of(cfg))),
                                    reports_to=ctx.tracker.live_metrics(ctx.run_id) if ctx.tracker is not None else None),
    )
    fit(trainer, "finetune", f.max_failures, out_of_memory=OOM_HINT)
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


OOM_HINT = ("try finetune.zero_stage: 3 (partitions weights, gradients and optimizer state over the workers), "
            "finetune.offload_optimizer: true, finetune.activation_checkpointing: true, or more finetune.workers")


def parameter_count(spec) -> int:
    """Parameters of the configured network, counted on a meta-device copy that allocates nothing (a plugin family
    whose build cannot run there is built on the CPU)."""
    from ..runtime.checkpoints import family_for

    family = family_for(spec)
    try:
        with torch.device("meta"):
            return count_parameters(family.build())
    except Exception:  # noqa: BLE001 - whatever a plugin's build raises on the meta device
        return count_parameters(family.build())


def check_activation_checkpointing(spec) -> None:
    """finetune.activation_checkpointing on a network without a checkpointable block stack: say so before any worker
    starts (the family's own switch, tried on a meta-device copy that allocates nothing)."""
    from ..runtime.checkpoints import family_for

    family = family_for(spec)
    with torch.device("meta"):
        family.enable_activation_checkpointing(family.build())


def deepspeed_config(f: FinetuneConfig, micro_batch: int) -> dict:
    return {
        "train_batch_size": f.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": f.grad_clip,
        # Buckets and ZeRO-3's gathered set sized for host memory: DeepSpeed's GPU-sized defaults (5e8-element
        # buckets, 1e9 live parameters) cost a 675M model more per worker than partitioning saves (benchmarks/finetune_memory.py).
        "zero_optimization": {"stage": f.zero_stage, "reduce_bucket_size": f.zero_bucket_elements, "allgather_bucket_size": f.zero_bucket_elements,
                              **({"stage3_max_live_parameters": f.zero3_max_live_parameters, "stage3_max_reuse_distance": f.zero3_max_live_parameters,
                                  "stage3_prefetch_bucket_size": min(f.zero_bucket_elements, f.zero3_max_live_parameters),
                                  # the optimizer steps through the partition in groups this size (its temporaries too)
                                  "sub_group_size": f.zero_bucket_elements} if f.zero_stage == 3 else {}),
                              **({"offload_optimizer": {"device": "cpu"}} if f.offload_optimizer else {})},
        # ZeRO-Offload with our torch AdamW (the same update as without offload) rather than DeepSpeedCPUAdam,
        # which would JIT-compile an op and change the arithmetic
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": f.bf16},
        "steps_per_print": 1 << 30,
        "zero_allow_untested_optimizer": True,
    }


def fp32_layout(engine, net: torch.nn.Module) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor of the consolidated state dict: parameters in fp32 at their full
    shape (ZeRO-3 keeps it in `ds_shape`, the local tensor being a shard), then the buffers (DeepSpeed's bf16
    mode casts parameters only: buffers keep their dtype)."""
    layout = [(name, torch.float32, tuple(getattr(p, "ds_shape", p.shape))) for name, p in engine.module.named_parameters()]
    layout += [(name, b.dtype, tuple(b.shape)) for name, b in engine.module.named_buffers()]
    expected, names = set(net.state_dict()), {n for n, _, _ in layout}
    assert names == expected, f"gathered keys differ: {sorted(expected ^ names)[:5]}"
    return layout


def iter_fp32_state(engine, keep: bool = True) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Full fp32 tensors one at a time, in `fp32_layout` order: DeepSpeed's master copy where it keeps one
    (ZeRO 1–3, bf16), else the module's. Collective under ZeRO-3: every rank must run it to the end; ranks
    without `keep` get None (each gathered tensor dropped at once)."""
    from deepspeed.utils import safe_get_full_fp32_param

    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        yield name, ((full if full is not None else param.detach()).float().cpu().clone() if keep else None)
        del full
    for name, buf in engine.module.named_buffers():
        yield name, (buf.detach().cpu().clone() if keep else None)


def write_fp32_checkpoint(engine, net: torch.nn.Module, uri: str, spec, write: bool, **extra) -> None:
    """Consolidate the fp32 weights into one safetensors file at `uri`, a tensor at a time: the writing rank
    holds one full tensor beyond its training state, never the whole model (rank 0's peak of a 675M ZeRO-3
    run would otherwise grow by its 2.7 GB of fp32 weights). Collective under ZeRO-3: every rank calls it."""
    layout = fp32_layout(engine, net)
    tensors = iter_fp32_state(engine, keep=write)
    try:
        if write:
            save_checkpoint_streaming(uri, layout, tensors, spec, **extra)
    finally:
        for _ in tensors:  # the other ranks' gathers need this one to the end, also after a failed write
            pass


def _finetune_loop(loop_cfg: dict) -> None:
    """Runs on every Ray Train worker: DeepSpeed over this worker's share of S, resuming from the latest checkpoint."""
    import ray.train
    import ray.train.torch

    from ..data.codec import CODECS
    from ..runtime.shards import SampleShard
    from ..runtime.train import UnusableCheckpoint, quiet_worker_logs, report_deepspeed, restore_deepspeed

    quiet_worker_logs()
    if not loop_cfg["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # torch's extension loader warns "No CUDA runtime is found" on a machine with a CUDA toolkit but no GPU: a CPU
        # worker is meant to have none.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import deepspeed

    f = FinetuneConfig.model_validate(loop_cfg["section"])
    p, stage_dir, seed, h = loop_cfg["plan"], loop_cfg["stage_dir"], loop_cfg["seed"], loop_cfg["config_hash"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_torch_threads(f.threads_per_worker)
    device = ray.train.torch.get_device()
    codec = CODECS[loop_cfg["codec"]]
    shard = SampleShard(loop_cfg["samples"], codec.column, rank, world)

    def engine_from_base():
        family, net = load_model(loop_cfg["spec"], loop_cfg["base"])
        if f.activation_checkpointing:
            family.enable_activation_checkpointing(net)
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=f.lr, weight_decay=f.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_warmup(s, p["warmup_steps"]))
        # DeepSpeed prints "... shm_comm_op built successfully" (a bare print) each time its comm backend starts.
        with contextlib.redirect_stdout(io.StringIO()):
            engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, lr_scheduler=sched,
                                                   config=deepspeed_config(f, p["micro_batch"]), dist_init_required=False)
        return family, net, engine, sched

    family, net, engine, sched = engine_from_base()
    try:
        client = restore_deepspeed(engine, "finetune", h)
    except UnusableCheckpoint:
        family, net, engine, sched = engine_from_base()
        client = None
    start, losses, history, initial = 0, [], [], None
    shown = Progress()
    if client is not None:
        start, losses, history, initial = int(client["step"]), list(client["losses"]), list(client["history"]), client["initial_loss"]
        if rank == 0:
            shown.update(f"[finetune] resuming at step {start}/{p['steps']} from the latest checkpoint", final=True)
    dtype = torch.bfloat16 if f.bf16 else torch.float32

    t0 = time.time()
    for step in range(start, p["steps"]):
        torch.manual_seed(derive_seed(seed, "finetune-torch", rank, step))  # dropout etc.: the same draws after a resume
        batch = shard.micro_batch(step, p["micro_batch"], seed)
        x = codec.to_model(torch.from_numpy(codec.decode_batch(batch[codec.column]))).to(device, dtype)
        y = torch.from_numpy(batch["label"]).to(device)
        gen = torch.Generator().manual_seed(derive_seed(seed, "finetune-noise", rank, step))
        loss = family.training_loss(engine, x, y, gen)
        engine.backward(loss)
        engine.step()
        losses = (losses + [loss.item()])[-10:]
        initial = losses[0] if initial is None else initial
        done = step + 1
        if done == 1 or done % 10 == 0 or done == p["steps"]:
            history.append({"step": done, "loss": sum(losses) / len(losses), "lr": sched.get_last_lr()[0]})
            if rank == 0:
                shown.update(f"[finetune] step {done}/{p['steps']} loss {history[-1]['loss']:.4f}", final=done == p["steps"])
            checkpoint_now = done % f.checkpoint_every == 0 and done < p["steps"]
            if not checkpoint_now:  # every rank reports at the same steps (a report is collective); the driver logs rank 0's
                ray.train.report(history[-1] | {"images_per_second": (done - start) * f.batch_size / max(time.time() - t0, 1e-9)})
        if done % f.checkpoint_every == 0 and done < p["steps"]:
            report_deepspeed(engine, {"step": done, "loss": sum(losses) / len(losses), "lr": sched.get_last_lr()[0],
                                      "images_per_second": (done - start) * f.batch_size / max(time.time() - t0, 1e-9)},
                             {"step": done, "losses": losses, "history": history, "initial_loss": initial, "config_hash": h})
    seconds = time.time() - t0

    write_fp32_checkpoint(engine, net, storage.join(stage_dir, MODEL), family.spec, write=rank == 0,  # collective under ZeRO-3
                          finetune_images=p["images"])
    if rank == 0:
        storage.write_json_atomic(storage.join(stage_dir, "history.json"), history)
        storage.write_json_atomic(storage.join(stage_dir, "train_summary.json"), {
            "final_loss": sum(losses) / len(losses) if losses else None,
            "initial_loss": initial,
            "images_per_second": round((p["steps"] - start) * f.batch_size / max(seconds, 1e-9), 1),
        })
