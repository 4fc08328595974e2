"""Stage `pretrain`: train a built-in model on the real training split with Ray Train (DDP).

Writes `<output>/pretrain/model.safetensors` holding the EMA weights (θ_base), with the images seen in
its metadata. Resumable: a progress checkpoint every `pretrain.checkpoint_every` steps.
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from .. import storage
from ..config import DataConfig, PretrainConfig
from ..context import StageContext
from ..data import get_dataset
from ..inputs import StageInputs
from ..manifest import Manifest
from ..models.checkpoint import save_checkpoint
from ..runtime.run_model import dataset_of, family_for, spec_of
from ..runtime.threads import set_torch_threads
from ..runtime.cluster import ensure_ray, resolve_use_gpu
from ..runtime.progress import Progress
from ..runtime.seeds import derive_seed
from ..train_math import count_parameters, ema_update, warmup_cosine

log = logging.getLogger("neon_ray")
BASE_MODEL = "model.safetensors"


INPUTS = StageInputs(fields=("seed", "model.family", "model.preset", "model.options", "pretrain"), derived=("dataset", "data_spec"))


def run(p: PretrainConfig, ctx: StageContext) -> Manifest:
    cfg = ctx.cfg
    dataset_of(cfg).load("train")  # fail fast (on the driver) when the data is missing
    rec = ctx.start()
    ensure_ray(cfg.ray)

    from ..runtime.ray_train import fit, torch_trainer

    use_gpu = resolve_use_gpu(p.use_gpu)
    trainer = torch_trainer(_train_loop, {"spec": spec_of(cfg), "data": cfg.data.model_dump(), "section": p.model_dump(),
                                          "seed": cfg.seed, "stage_dir": rec.dir, "config_hash": ctx.config_hash},
                            p, f"pretrain-{ctx.config_hash}", rec.dir, fresh=ctx.force, use_gpu=use_gpu)
    fit(trainer, "pretrain", p.max_failures)
    summary = storage.read_json(storage.join(rec.dir, "train_summary.json"))
    rec.outputs = {"model": storage.join(rec.dir, BASE_MODEL), "history": storage.join(rec.dir, "history.json")}
    rec.metrics = {k: summary[k] for k in ("final_loss", "train_images", "parameters", "images_per_second")}
    rec.params = {"workers": p.workers, "use_gpu": use_gpu, "steps": p.steps, "batch_size": p.batch_size, "lr": p.lr}
    return rec.finish()


def _train_loop(loop_cfg: dict) -> None:
    """Runs on every Ray Train worker. Batches are drawn from (seed, step); noise from (seed, rank, step)."""
    import ray.train
    import ray.train.torch

    from ..runtime.ray_train import quiet_worker_logs, report_state, restored_state

    quiet_worker_logs()
    p = PretrainConfig.model_validate(loop_cfg["section"])
    data = DataConfig.model_validate(loop_cfg["data"])
    stage_dir, h, seed = loop_cfg["stage_dir"], loop_cfg["config_hash"], loop_cfg["seed"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_torch_threads(p.cpus_per_worker)
    device = ray.train.torch.get_device()

    dataset = get_dataset(data.name, data.path, data.download, options=data.options)
    images, labels = dataset.load("train")
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)
    family = family_for(loop_cfg["spec"])
    torch.manual_seed(derive_seed(seed, "pretrain-init"))  # the network's initialisation, like every other draw, keyed by the seed
    net = family.build()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    history: list[dict] = []
    step0 = 0
    shown = Progress()
    if (state := restored_state("pretrain", h)) is not None:
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step0, history = int(state["step"]), list(state.get("history", []))
        if rank == 0:
            shown.update(f"[pretrain] resuming at step {step0}/{p.steps} from the latest checkpoint", final=True)
    for group in opt.param_groups:  # a checkpoint written before the schedule was a LambdaLR lacks it
        group.setdefault("initial_lr", p.lr)
    # The rate is a function of the step alone, so a resumed run picks the schedule up at its step.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, p.steps, p.warmup_steps, final_fraction=0.05),
                                              last_epoch=step0 - 1)
    net.to(device)
    ema.to(device)
    model = ray.train.torch.prepare_model(net) if world > 1 else net
    model.train()
    if rank == 0:
        shown.update(f"[pretrain] {family.spec.family}/{family.spec.preset}: {count_parameters(net) / 1e6:.2f}M parameters, "
                     f"{p.steps} steps × {p.batch_size} images on {world} worker(s)", final=True)

    t0, seen0, running = time.time(), step0 * p.batch_size, []
    for step in range(step0, p.steps):
        torch.manual_seed(derive_seed(seed, "pretrain-torch", rank, step))  # dropout etc.: the same draws after a resume
        g = torch.Generator().manual_seed(derive_seed(seed, "pretrain-batch", step))
        idx = torch.randint(0, len(labels_t), (p.batch_size,), generator=g)[rank::world]
        x = dataset.codec.to_model(images_t[idx]).to(device)
        y = labels_t[idx].to(device)
        noise_gen = torch.Generator().manual_seed(derive_seed(seed, "pretrain-noise", rank, step))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=p.bf16):
            loss = family.training_loss(model, x, y, noise_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lr = sched.get_last_lr()[0]  # this step's rate
        torch.nn.utils.clip_grad_norm_(net.parameters(), p.grad_clip)
        opt.step()
        sched.step()
        ema_update(ema, net, p.ema_decay)
        running.append(loss.item())

        if (step + 1) % p.log_every == 0 or step + 1 == p.steps:
            rate = ((step + 1) * p.batch_size - seen0) / max(time.time() - t0, 1e-9)
            mean_loss = sum(running) / len(running)
            running = []
            history.append({"step": step + 1, "loss": mean_loss, "lr": lr})
            if rank == 0:
                eta = (p.steps - step - 1) * p.batch_size / max(rate, 1e-9)
                shown.update(f"[pretrain] step {step + 1}/{p.steps} loss {mean_loss:.4f} {rate:.0f} img/s eta {eta / 60:.1f} min",
                             final=step + 1 == p.steps)
        if (step + 1) % p.checkpoint_every == 0 and step + 1 < p.steps:  # every rank reports; rank 0 attaches the state
            state = {"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                     "history": history, "config_hash": h} if rank == 0 else None
            report_state({"step": step + 1}, state)

    if rank == 0:
        train_images = p.steps * p.batch_size
        save_checkpoint(storage.join(stage_dir, BASE_MODEL), ema.state_dict(), family.spec, train_images=train_images, ema_decay=p.ema_decay)
        storage.write_json_atomic(storage.join(stage_dir, "history.json"), history)
        storage.write_json_atomic(storage.join(stage_dir, "train_summary.json"), {
            "final_loss": history[-1]["loss"] if history else None,
            "train_images": train_images,
            "parameters": count_parameters(net),
            "images_per_second": round(((p.steps * p.batch_size) - seen0) / max(time.time() - t0, 1e-9), 1),
        })
