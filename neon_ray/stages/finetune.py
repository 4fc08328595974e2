"""Stage `finetune`: θ_ft = a short fine-tune of θ_base on S with the model's own loss (Ray Train + DeepSpeed).

DeepSpeed runs the optimiser (ZeRO stage 0–3, optional bf16 with fp32 master weights). At the end
every rank takes part in gathering the full fp32 parameters, and rank 0 writes θ_ft as safetensors:
the merge needs fp32 θ_ft, since θ_ft − θ_base is far below bf16 resolution.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import torch

from .. import storage
from ..config import FinetuneConfig, RunConfig
from ..context import StageContext
from ..errors import NeonError
from ..manifest import Manifest
from ..models.checkpoint import save_checkpoint
from ..runtime.checkpoints import dataset_of, load_model, set_torch_threads, spec_of, train_images_of
from ..runtime.cluster import ensure_ray, ray_storage, resolve_use_gpu
from ..runtime.progress import Progress
from ..runtime.seeds import derive_seed
from ..training import linear_warmup

log = logging.getLogger("neon_ray")
MODEL = "model.safetensors"


def config_parts(cfg: RunConfig) -> tuple:
    return (cfg.seed, cfg.finetune)


def plan(f: FinetuneConfig) -> dict:
    steps = max(1, math.ceil(f.budget_images / f.batch_size))
    return {"steps": steps, "micro_batch": f.batch_size // f.workers, "warmup_steps": math.ceil(f.warmup_images / f.batch_size),
            "images": steps * f.batch_size}


def run(f: FinetuneConfig, ctx: StageContext) -> Manifest:
    cfg = ctx.cfg
    base, samples = ctx.input_uri("base"), ctx.input_uri("generate", "samples")
    p = plan(f)
    rec = ctx.start()
    ensure_ray(cfg.ray)

    import ray
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    codec = dataset_of(cfg).codec
    pafs, path = storage.pyarrow_filesystem(samples)
    ds = ray.data.read_parquet(path, filesystem=pafs, num_cpus=cfg.generate.io_cpus).select_columns([codec.column, "label"])
    n = ds.count()
    if n == 0:
        raise NeonError(f"empty synthetic set: {storage.redact_uri(samples)} holds no images")
    if n < f.batch_size:
        raise NeonError(f"finetune.batch_size: {f.batch_size} exceeds the synthetic set's {n} images")
    use_gpu = resolve_use_gpu(f.use_gpu)
    trainer = TorchTrainer(
        _finetune_loop,
        train_loop_config={"spec": spec_of(cfg), "codec": codec.kind, "section": f.model_dump(), "seed": cfg.seed, "base": base,
                           "stage_dir": rec.dir, "plan": p, "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=f.workers, use_gpu=use_gpu, resources_per_worker={"CPU": f.cpus_per_worker}),
        datasets={"train": ds},
        run_config=TrainRunConfig(name=f"finetune-{ctx.config_hash}", **ray_storage(storage.join(rec.dir, "ray"))),
    )
    trainer.fit()
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
    rec.params = {"zero_stage": f.zero_stage, "bf16": f.bf16, "lr": f.lr, "batch_size": f.batch_size, "workers": f.workers,
                  "warmup_images": f.warmup_images, "budget_images": f.budget_images, "use_gpu": use_gpu}
    return rec.finish()


def _deepspeed_config(f: FinetuneConfig, micro_batch: int) -> dict:
    return {
        "train_batch_size": f.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": f.grad_clip,
        "zero_optimization": {"stage": f.zero_stage},
        "bf16": {"enabled": f.bf16},
        "steps_per_print": 1 << 30,
        "zero_allow_untested_optimizer": True,
    }


def _gather_fp32_state(engine, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 weights: DeepSpeed's master copy where it keeps one (ZeRO 1–3, bf16), else the module's.

    Collective under ZeRO-3: every rank must call it.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        state[name] = (full if full is not None else param.detach()).float().cpu().clone()
    for name, buf in engine.module.named_buffers():
        state[name] = buf.detach().cpu().clone()
    expected = set(net.state_dict())
    assert set(state) == expected, f"gathered keys differ: {sorted(expected ^ set(state))[:5]}"
    return state


def _micro_batches(shard, micro_batch: int, cache: bool, seed: int, rank: int):
    """Endless micro-batches of this worker's shard of S, reshuffled every epoch.

    With `cache`, the shard is read once and kept encoded (S is small: 1k–50k images of a few hundred
    bytes to a few KB); epochs are then seeded permutations of it. Otherwise every epoch streams the
    shard again through Ray Data (each pass restarts its pipeline: seconds per epoch).
    """
    epoch = 0
    if cache:
        parts = list(shard.iter_batches(batch_size=4096, batch_format="numpy"))
        table = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]} if parts else {}
        n = len(table.get("label", ()))
        if n < micro_batch:
            raise NeonError(f"finetune.batch_size: worker {rank}'s shard of S holds {n} samples, fewer than its micro-batch {micro_batch}")
        while True:
            order = np.random.default_rng(derive_seed(seed, "ft", rank, epoch) % (2**63)).permutation(n)
            for start in range(0, n - micro_batch + 1, micro_batch):  # drop_last: equal micro-batches
                idx = order[start : start + micro_batch]
                yield {k: v[idx] for k, v in table.items()}
            epoch += 1
    while True:
        yielded = False
        for batch in shard.iter_batches(batch_size=micro_batch, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=4 * micro_batch,
                                        local_shuffle_seed=derive_seed(seed, "ft", rank, epoch) % (2**31)):
            yielded = True
            yield batch
        if not yielded:
            raise NeonError(f"finetune.batch_size: worker {rank}'s shard of S is smaller than its micro-batch {micro_batch}")
        epoch += 1


def _finetune_loop(loop_cfg: dict) -> None:
    """Runs on every Ray Train worker: DeepSpeed engine over this worker's shard of S."""
    import ray.train
    import ray.train.torch

    from ..data.codec import CODECS

    if not loop_cfg["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    f = FinetuneConfig.model_validate(loop_cfg["section"])
    p, stage_dir, seed = loop_cfg["plan"], loop_cfg["stage_dir"], loop_cfg["seed"]
    rank = ray.train.get_context().get_world_rank()
    set_torch_threads(f.threads_per_worker)
    device = ray.train.torch.get_device()

    family, net = load_model(loop_cfg["spec"], loop_cfg["base"])
    codec = CODECS[loop_cfg["codec"]]
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=f.lr, weight_decay=f.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_warmup(s, p["warmup_steps"]))
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, lr_scheduler=sched, config=_deepspeed_config(f, p["micro_batch"]),
                                           dist_init_required=False)
    dtype = torch.bfloat16 if f.bf16 else torch.float32
    shard = ray.train.get_dataset_shard("train")

    step, losses, history, t0 = 0, [], [], time.time()
    shown = Progress()
    for batch in _micro_batches(shard, p["micro_batch"], f.cache_shard, seed, rank):
        if step >= p["steps"]:
            break
        x = codec.to_model(torch.from_numpy(codec.decode_batch(batch[codec.column]))).to(device, dtype)
        y = torch.from_numpy(batch["label"].astype("int64")).to(device)
        gen = torch.Generator().manual_seed(derive_seed(seed, "finetune-noise", rank, step))
        loss = family.training_loss(engine, x, y, gen)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        step += 1
        if step == 1 or step % 10 == 0 or step == p["steps"]:
            history.append({"step": step, "loss": sum(losses[-10:]) / len(losses[-10:]), "lr": sched.get_last_lr()[0]})
            if rank == 0:
                shown.update(f"[finetune] step {step}/{p['steps']} loss {history[-1]['loss']:.4f}", final=step == p["steps"])
    seconds = time.time() - t0

    state = _gather_fp32_state(engine, net)  # collective under ZeRO-3
    if rank == 0:
        save_checkpoint(storage.join(stage_dir, MODEL), state, family.spec, finetune_images=p["images"])
        storage.write_json_atomic(storage.join(stage_dir, "history.json"), history)
        storage.write_json_atomic(storage.join(stage_dir, "train_summary.json"), {
            "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "initial_loss": losses[0],
            "images_per_second": round(p["images"] / max(seconds, 1e-9), 1),
        })
