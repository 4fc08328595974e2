#!/usr/bin/env python
"""Memory and speed of DeepSpeed ZeRO 0 / 2 / 3 / 3 + offload fine-tuning of large models on Ray Train (CPU).

    python benchmarks/finetune_memory.py                                    # DiT-XL/2 (675M), xAR-L (608M), VAR-d16 (310M), IMM-DiT-XL/2 (677M), 3 steps
    python benchmarks/finetune_memory.py --models dit-tiny,xar-tiny,var-tiny,imm-tiny --steps 2   # a one-minute check of the script
    python benchmarks/finetune_memory.py --bf16 --configs zero0,zero3           # bf16 with fp32 master weights

Each row fine-tunes the preset from the same random initialisation (torch seed 0) for --steps steps of
AdamW at global batch --batch through Ray Train workers running DeepSpeed with the product's own
DeepSpeed config (runtime/deepspeed.py `deepspeed_config`) and its consolidation (`write_fp32_checkpoint`):
- zero0: 1 worker holding a full replica (two 675M replicas with fp32 Adam, ~11 GB each, do not fit in 24 GiB);
- zero2, zero3, zero3+offload: 2 workers, the global batch split between them.
Workers get 2 / workers torch threads each, so every row uses the same two cores, and the finetune stage's
worker environment (runtime/ray_train.py host_memory_env) and DeepSpeed bucket sizes. A configuration whose workers
do not fit (Ray's memory monitor stops them) prints a "did not run" row and the script goes on.

The loss is a fixed regression of the network's output onto targets drawn per row from (seed, step, row)
(VAR: the cross-entropy of its logits against random codes, its input random teacher-forcing features; not the
family objective, whose noise and tokenizer are per batch): the global batch is then the same rows however
the workers split it, and ZeRO-0 and ZeRO-3 must reach the same weights (in fp32; under --bf16 to the
rounding of bf16 gradients, which ZeRO-3 reduces across the workers in bf16). Columns, per worker:
- peak RSS: the worker process's maximum resident memory over the training steps (getrusage), and again
  after the consolidation (the full fp32 weights gathered a tensor at a time and streamed to one file by rank 0);
- s/step: the median step time (forward, backward, optimizer step) after the first step;
- max |Δ| vs ZeRO-0: the largest absolute difference between the consolidated fp32 weights and the ZeRO-0
  ones after the same steps, seeds and global batch.
Then the merge of the base and the ZeRO-0 checkpoint (neon_ray.merge, streaming) in a fresh process: its peak
RSS above the process baseline against 3 × the largest tensor + 256 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SPECS = {  # ImageNet-256 latent shapes of the official models; Fashion-MNIST shapes for the tiny ones
    "DiT-XL/2": ("diffusion", (4, 32, 32), 1000), "xAR-L": ("xar", (16, 16, 16), 1000),
    "VAR-d16": ("var", (3, 256, 256), 1000),  # 680 tokens of the 16×16 VQ-VAE map at 256²
    "IMM-DiT-XL/2-im256": ("imm", (4, 32, 32), 1000),
    "dit-tiny": ("diffusion", (1, 28, 28), 10), "xar-tiny": ("xar", (1, 28, 28), 10), "var-tiny": ("var", (1, 28, 28), 10),
    "imm-tiny": ("imm", (1, 28, 28), 10),
}
CONFIGS = {"zero0": (0, False, 1), "zero2": (2, False, 2), "zero3": (3, False, 2), "zero3+offload": (3, True, 2)}


def slug_of(model: str, bf16: bool) -> str:
    """The file-name stem of a model's reference checkpoints (one set per precision)."""
    return model.replace("/", "") + ("-bf16" if bf16 else "")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def batch_rows(family, net_kind: str, rows: range, step: int, seed: int, out_channels: int | None) -> tuple[tuple, torch.Tensor]:
    """Network inputs (x, t, y; IMM: x, t, s, y) and regression targets of the given global rows, each row from its own
    generator (targets shaped like the output: DiT-XL/2 learns σ, so it predicts 2 × its input channels)."""
    xs, ts, ss, ys, targets = [], [], [], [], []
    for row in rows:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 10_007 + row)
        if net_kind == "var":  # teacher-forcing features of scales 2 … K; the codes of all L tokens as targets
            tokens, first, v = sum(p * p for p in family.patch_nums), family.patch_nums[0] ** 2, family.vq_config.vocab
            xs.append(torch.randn(tokens - first, family.vq_config.z, generator=g)), ts.append(torch.zeros(()))
            targets.append(torch.randint(0, v, (tokens,), generator=g))
        elif net_kind == "xar":
            n, d, k = family.grid[0] * family.grid[1], family.token_dim, family.clusters
            xs.append(torch.randn(n, d, generator=g)), ts.append(torch.rand(k, generator=g)), targets.append(torch.randn(n, d, generator=g))
        elif net_kind == "imm":  # a jump from t to s < t, times in (0, 0.994) as IMM samples them
            shape = family.data_shape
            t = torch.rand((), generator=g) * 0.994
            xs.append(torch.randn(*shape, generator=g)), ts.append(t), ss.append(t * torch.rand((), generator=g))
            targets.append(torch.randn(*shape, generator=g))
        else:
            shape = family.data_shape
            xs.append(torch.randn(*shape, generator=g)), ts.append(torch.rand((), generator=g) * 999)
            targets.append(torch.randn(out_channels, *shape[1:], generator=g))
        ys.append(torch.randint(0, family.spec.num_classes, (), generator=g))
    times = (torch.stack(ts), torch.stack(ss)) if ss else (torch.stack(ts),)
    return (torch.stack(xs), *times, torch.stack(ys)), torch.stack(targets)


def train_loop(cfg: dict) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    from safetensors.torch import save_file

    from neon_ray.config import FinetuneConfig
    from neon_ray.models import ModelSpec, get_family
    from neon_ray.models.checkpoint import SafetensorsReader
    from neon_ray.runtime.deepspeed import deepspeed_config, write_fp32_checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, 2 // world))
    family_name, shape, classes = SPECS[cfg["model"]]
    family = get_family(family_name)(ModelSpec(family_name, cfg["model"], shape, classes))
    torch.manual_seed(0)
    net = family.build().train()
    if cfg["activation_checkpointing"]:
        family.enable_activation_checkpointing(net)
    f = FinetuneConfig(zero_stage=cfg["zero"], offload_optimizer=cfg["offload"], workers=world, batch_size=cfg["batch"], lr=1e-4,
                       bf16=cfg["bf16"])
    dtype = torch.bfloat16 if f.bf16 else torch.float32  # as the finetune stage feeds a bf16 engine
    opt = torch.optim.AdamW(net.parameters(), lr=f.lr)
    micro = cfg["batch"] // world
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=deepspeed_config(f, micro), dist_init_required=False)
    times = []
    for step in range(cfg["steps"]):
        inputs, target = batch_rows(family, family_name, range(rank * micro, (rank + 1) * micro), step, seed=1,
                                    out_channels=getattr(net, "out_channels", None))
        t0 = time.perf_counter()
        if family_name == "var":  # (features, class): next-scale logits over the codebook
            x, _, y = inputs
            loss = torch.nn.functional.cross_entropy(engine(x.to(dtype), y).float().flatten(0, 1), target.flatten())
        else:
            loss = torch.nn.functional.mse_loss(engine(*(v.to(dtype) if v.is_floating_point() else v for v in inputs)).float(), target)
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
    train_peak = rss_mb()
    reference = cfg["reference"]
    written = reference if cfg["zero"] == 0 else os.path.join(cfg["out"], "consolidated.safetensors")
    write_fp32_checkpoint(engine, net, written, family.spec, write=rank == 0)  # the finetune stage's consolidation
    record = {"rank": rank, "train_peak_mb": train_peak, "gather_peak_mb": rss_mb(),
              "s_per_step": statistics.median(times[1:] or times), "params": None}
    if rank == 0:
        with SafetensorsReader(written) as mine:
            if cfg["zero"] == 0:
                torch.manual_seed(0)  # the base (the same initialisation), for the merge measurement
                save_file({k: v.contiguous() for k, v in family.build().state_dict().items()}, cfg["base"])
            elif os.path.exists(reference):
                with SafetensorsReader(reference) as ref:
                    record["max_abs_diff"] = max((mine.get_tensor(k) - ref.get_tensor(k)).abs().max().item() for k in ref.keys())
            record["largest_tensor_mb"] = max(torch.Size(mine.shape(k)).numel() * mine.dtype(k).itemsize for k in mine.keys()) / 2**20
            names = {name for name, _ in net.named_parameters()}
            record["params"] = sum(torch.Size(mine.shape(k)).numel() for k in mine.keys() if k in names)
    with open(os.path.join(cfg["out"], f"rank{rank}.json"), "w") as fh:
        json.dump(record, fh)


def run_config(model: str, name: str, args, work: str) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from neon_ray.models import ModelSpec
    from neon_ray.runtime.ray_train import host_memory_env
    from neon_ray.runtime.deepspeed import network_facts

    zero, offload, workers = CONFIGS[name]
    family_name, shape, classes = SPECS[model]
    parameters = network_facts(ModelSpec(family_name, model, shape, classes), activation_checkpointing=False)
    out = tempfile.mkdtemp(prefix=f"{name}-", dir=work)
    slug = slug_of(model, args.bf16)
    cfg = {"model": model, "zero": zero, "offload": offload, "batch": args.batch, "steps": args.steps, "out": out, "bf16": args.bf16,
           "activation_checkpointing": args.activation_checkpointing,
           "reference": os.path.join(work, f"{slug}-zero0.safetensors"), "base": os.path.join(work, f"{slug}-base.safetensors")}
    trainer = TorchTrainer(train_loop, train_loop_config=cfg,
                           scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name=f"mem-{slug}-{name}", storage_path=os.path.join(work, "ray"),
                                                worker_runtime_env={"env_vars": host_memory_env(parameters)}))  # as the finetune stage's workers
    trainer.fit()
    return [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out)) if f.startswith("rank")]


MERGE_CHILD = """
import json, resource, sys
from neon_ray.merge import merge_files
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
merge_files(sys.argv[1], sys.argv[2], sys.argv[3], w=1.0)
print(json.dumps({"peak_above_baseline_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
"""


def merge_peak(work: str, slug: str) -> float:
    base, ft = os.path.join(work, f"{slug}-base.safetensors"), os.path.join(work, f"{slug}-zero0.safetensors")
    out = subprocess.run([sys.executable, "-c", MERGE_CHILD, base, ft, os.path.join(work, f"{slug}-neon.safetensors")],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_above_baseline_mb"]


def did_not_run(exc: BaseException) -> str:
    """One line for a configuration that failed, e.g. workers killed by Ray's memory monitor."""
    text = str(exc)
    if "memory" in text.lower() and ("OutOfMemory" in text or "memory used" in text):
        used = sorted({float(m) for m in re.findall(r"actual memory used=([0-9.]+)GB", text)}, reverse=True)
        return "out of memory" + (f" (a worker at {used[0]:.1f} GB when Ray's memory monitor stopped it)" if used else "")
    return (text.strip().splitlines() or [type(exc).__name__])[-1][:160]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="DiT-XL/2,xAR-L,VAR-d16,IMM-DiT-XL/2-im256")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="global batch (split over the workers)")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="DeepSpeed bf16 (bf16 weights, activations and gradients; fp32 master weights and Adam)")
    ap.add_argument("--work", default=None, help="folder for checkpoints and Ray Train state (default: a temp dir, removed)")
    args = ap.parse_args()
    import ray

    work = args.work or tempfile.mkdtemp(prefix="neon-finetune-memory-")
    os.makedirs(work, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
    print(f"# finetune memory, CPU ({os.cpu_count()} cores), torch {torch.__version__}, {args.steps} AdamW steps, global batch {args.batch}, "
          f"{'bf16 (fp32 master)' if args.bf16 else 'fp32'}{', activation checkpointing' if args.activation_checkpointing else ''}")
    print("| model | params | config | workers | peak RSS / worker, training (MB) | after gather, rank 0 / other (MB) | s/step | vs ZeRO-0 peak | max abs diff vs ZeRO-0 |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for model in args.models.split(","):
            slug = slug_of(model, args.bf16)
            zero0_record = os.path.join(work, f"{slug}-zero0.json")  # a later call with --work and without zero0 compares with it
            zero0_peak = json.load(open(zero0_record))["train_peak_mb"] if os.path.exists(zero0_record) else None
            for name in args.configs.split(","):
                try:
                    ranks = run_config(model, name, args, work)
                except Exception as exc:  # noqa: BLE001 (a row that does not fit is a result: say so, go on)
                    print(f"| {model} | | {name} | {CONFIGS[name][2]} | did not run: {did_not_run(exc)} | | | | |", flush=True)
                    continue
                peak = max(r["train_peak_mb"] for r in ranks)
                if name == "zero0":
                    zero0_peak = peak
                    with open(zero0_record, "w") as fh:
                        json.dump({"train_peak_mb": peak}, fh)
                r0 = next(r for r in ranks if r["rank"] == 0)
                others = [r["gather_peak_mb"] for r in ranks if r["rank"] != 0]
                ratio = f"{peak / zero0_peak:.2f}×" if zero0_peak else "–"
                diff = f"{r0['max_abs_diff']:.1e}" if "max_abs_diff" in r0 else "–"
                peaks = " / ".join(f"{r['train_peak_mb']:.0f}" for r in ranks)
                gathered = " / ".join([f"{r0['gather_peak_mb']:.0f}", *(f"{o:.0f}" for o in others)])
                step = statistics.mean(r["s_per_step"] for r in ranks)
                print(f"| {model} | {r0['params'] / 1e6:.1f}M | {name} | {len(ranks)} | {peaks} | {gathered} | {step:.2f} | {ratio} | {diff} |", flush=True)
            if os.path.exists(os.path.join(work, f"{slug}-zero0.safetensors")):
                largest = r0["largest_tensor_mb"]
                peak = merge_peak(work, slug)
                print(f"| {model} | merge (streaming) | | 1 | {peak:.0f} above baseline | bound 3 × {largest:.0f} + 256 = {3 * largest + 256:.0f} | "
                      f"| {'within' if peak <= 3 * largest + 256 else 'ABOVE'} | |", flush=True)
    finally:
        ray.shutdown()
        if args.work is None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
