"""The fine-tune's Ray Train loop: DeepSpeed over each worker's share of S with the family's own loss, resumable
from the latest checkpoint, ending with θ_ft consolidated in fp32 (runtime/deepspeed.py)."""

from __future__ import annotations

import time

import torch

from .. import storage
from ..config import FinetuneConfig
from ..train_math import linear_warmup
from .run_model import load_model
from .threads import set_torch_threads
from .progress import Progress
from .seeds import derive_seed


def finetune_loop(loop_cfg: dict) -> None:
    """Runs on every Ray Train worker: DeepSpeed over this worker's share of S, resuming from the latest checkpoint."""
    import ray.train
    import ray.train.torch

    from ..data.codec import CODECS
    from .deepspeed import (UnusableCheckpoint, deepspeed_config, report_deepspeed, restore_deepspeed, start_deepspeed_worker,
                            without_build_notice, write_fp32_checkpoint)
    from .shards import SampleShard

    deepspeed = start_deepspeed_worker(loop_cfg["use_gpu"])
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
        opt = torch.optim.AdamW(net.parameters(), lr=f.lr, betas=f.betas, weight_decay=f.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_warmup(s, p["warmup_steps"]))
        with without_build_notice():
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

    write_fp32_checkpoint(engine, net, loop_cfg["model_uri"], family.spec, write=rank == 0,  # collective under ZeRO-3
                          finetune_images=p["images"])
    if rank == 0:
        storage.write_json_atomic(storage.join(stage_dir, "history.json"), history)
        storage.write_json_atomic(storage.join(stage_dir, "train_summary.json"), {
            "final_loss": sum(losses) / len(losses) if losses else None,
            "initial_loss": initial,
            "images_per_second": round((p["steps"] - start) * f.batch_size / max(seconds, 1e-9), 1),
        })
