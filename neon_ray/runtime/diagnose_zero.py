"""The diagnosis under DeepSpeed ZeRO (`diagnose.zero_stage`), for a model whose gradient does not fit one worker:
a Ray Train group of `diagnose.workers` engines (finetune.workers when 0) holds θ_base as the fine-tune held it, and returns one `Share` of
all the batches for `diagnosis.conclude`.

Every rank runs every held-out batch with that batch's own draws, so the gradient DeepSpeed averages over the
ranks is the batch's own gradient and the per-batch statistics are the plain path's (up to float summation order):
ZeRO shards the parameters (stage 3) and gradients (2, 3), not the batches. Δ = θ_ft − θ_base is read tensor by
tensor and each rank keeps the part for its own every-world-th parameter, so ⟨g_b, Δ⟩, |Σ_b g_b|² and |Δ|² are
sums of per-rank parts (an all-reduce each). The line θ(w) = θ_base − w·Δ is written into the engine's parameters
a tensor at a time (under ZeRO-3 gathered, set by rank 0 and partitioned again), exactly as the merge writes it.
An optimizer step at lr 0 after each backward leaves θ_base as it is and clears DeepSpeed's gradient buffers.
"""

from __future__ import annotations

import types

import torch

from .. import storage
from ..config import DiagnoseConfig, RunConfig
from ..diagnosis import Share, batch_generator
from ..merge import neon_tensor
from ..models.checkpoint import SafetensorsReader
from .deepspeed import deepspeed_config, network_facts, start_deepspeed_worker, without_build_notice
from .run_model import load_model, spec_of
from .threads import set_torch_threads


def measure_with_zero(cfg: RunConfig, section: DiagnoseConfig, base: str, finetuned: str, batches, seeds,
                      stage_dir: str, name: str, fresh: bool) -> Share:
    """The gradient pass and the line on all `batches` by a ZeRO worker group (driver side)."""
    from .cluster import resolve_use_gpu
    from .ray_train import fit, host_memory_env, torch_trainer

    f = cfg.finetune
    use_gpu = resolve_use_gpu(f.use_gpu)
    group = types.SimpleNamespace(workers=section.workers or f.workers, cpus_per_worker=section.cpus_per_worker,
                                  placement_strategy=f.placement_strategy, max_failures=f.max_failures)
    parameters = network_facts(spec_of(cfg), False)
    loop_cfg = {"spec": spec_of(cfg), "base": base, "finetuned": finetuned, "batches": batches, "seeds": list(seeds),
                "w_points": sorted({float(w) for w in section.w_points} - {0.0}), "zero_stage": section.zero_stage,
                "finetune": f.model_dump(), "batch_size": section.batch_size, "use_gpu": use_gpu,
                "threads": max(1, int(section.cpus_per_worker)), "share_uri": storage.join(stage_dir, "share.json")}
    trainer = torch_trainer(zero_diagnose_loop, loop_cfg, group, name, stage_dir, fresh=fresh, use_gpu=use_gpu,
                            worker_env=None if use_gpu else host_memory_env(parameters))
    fit(trainer, "diagnose", f.max_failures, out_of_memory="try diagnose.zero_stage: 3 or more diagnose.workers")
    m = storage.read_json(loop_cfg["share_uri"])  # Ray Train V2 keeps reported metrics only with a checkpoint
    line = {0.0: list(m["base_losses"])} | {float(w): list(v) for w, v in m["line"]}
    return Share(dots=list(m["dots"]), line=line, g_sum={}, delta_sq=float(m["delta_sq"]), images=int(m["images"]),
                 g_sum_sq=float(m["g_sum_sq"]))


def zero_diagnose_loop(c: dict) -> None:
    """Runs on every Ray Train worker: the same batches on every rank, each rank's sums over its parameters."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from ..config import FinetuneConfig

    deepspeed = start_deepspeed_worker(c["use_gpu"])
    from deepspeed.utils import safe_get_full_grad

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_torch_threads(c["threads"])
    device = ray.train.torch.get_device()
    family, net = load_model(c["spec"], c["base"])
    net.eval()  # the objective without dropout, as the plain path
    # fp32, no clipping, every rank the same micro-batch: DeepSpeed's average over ranks is the batch's own gradient
    f = FinetuneConfig.model_validate(c["finetune"]).model_copy(update={
        "zero_stage": c["zero_stage"], "bf16": False, "offload_optimizer": False, "grad_clip": 0.0,
        "batch_size": c["batch_size"] * world})
    with without_build_notice():
        engine, _, _, _ = deepspeed.initialize(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
                                               config=deepspeed_config(f, c["batch_size"]), dist_init_required=False)
    engine.eval()
    params = list(engine.module.named_parameters())
    with storage.local_copy(c["base"], "base checkpoint") as b, storage.local_copy(c["finetuned"], "fine-tuned checkpoint") as t, \
            SafetensorsReader(b) as base, SafetensorsReader(t) as ft:
        mine = {}  # Δ of this rank's parameters (fp32), those the merge extrapolates
        for i, (name, _) in enumerate(params):
            if i % world == rank:
                tb = base.get_tensor(name)
                if tb.is_floating_point() and torch.isfinite(tb).all():
                    mine[name] = ft.get_tensor(name).float() - tb.float()

        def total(x: float) -> float:
            v = torch.tensor([x], dtype=torch.float64, device=device)
            dist.all_reduce(v)
            return float(v.item())

        # 1. The gradient at θ_base, batch by batch (collective: every rank gathers every parameter's gradient in order).
        g_sum = {name: torch.zeros_like(d) for name, d in mine.items()}
        dots, base_losses = [], []
        for (x, y), seed in zip(c["batches"], c["seeds"]):
            loss = family.training_loss(engine, x.to(device), y.to(device), batch_generator(seed))
            engine.backward(loss)
            dot = 0.0
            for name, p in params:
                g = safe_get_full_grad(p)
                if name in mine and g is not None:
                    g = g.detach().float().cpu().reshape(mine[name].shape)
                    dot += float((g * mine[name]).sum(dtype=torch.float64))
                    g_sum[name] += g
                del g
            engine.step()  # lr 0: θ_base unchanged; the gradient buffers cleared
            dots.append(total(dot))
            base_losses.append(float(loss.detach()))
        g_sum_sq = total(sum(float(g.double().pow(2).sum()) for g in g_sum.values()))
        delta_sq = total(sum(float(d.double().pow(2).sum()) for d in mine.values()))
        del g_sum, mine

        # 2. The objective along the line, on the same batches and draws.
        line = []
        with torch.no_grad():
            for w in c["w_points"]:
                _set_line(engine, base, ft, w, rank, c["zero_stage"] == 3)
                line.append([w, [float(family.training_loss(engine, x.to(device), y.to(device), batch_generator(seed)))
                                 for (x, y), seed in zip(c["batches"], c["seeds"])]])
    if rank == 0:  # every rank holds the same sums
        storage.write_json_atomic(c["share_uri"], {"dots": dots, "base_losses": base_losses, "line": line, "g_sum_sq": g_sum_sq,
                                                   "delta_sq": delta_sq, "images": sum(int(x.shape[0]) for x, _ in c["batches"])})


def _set_line(engine, base: SafetensorsReader, ft: SafetensorsReader, w: float, rank: int, partitioned: bool) -> None:
    """θ(w) into the engine's module, tensor by tensor (`neon_tensor`, as the merge); under ZeRO-3 each parameter is
    gathered, set by rank 0 and partitioned again (collective)."""
    import deepspeed

    for name, p in engine.module.named_parameters():
        if partitioned:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(neon_tensor(base.get_tensor(name), ft.get_tensor(name), w).reshape(p.shape))
        else:
            p.data.copy_(neon_tensor(base.get_tensor(name), ft.get_tensor(name), w))
    stored = set(base.keys())
    for name, buf in engine.module.named_buffers():
        if name in stored:
            buf.copy_(neon_tensor(base.get_tensor(name), ft.get_tensor(name), w))
