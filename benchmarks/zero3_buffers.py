#!/usr/bin/env python
"""Where a ZeRO-3 worker's memory goes: DeepSpeed's own buffers after a few fp32 (or bf16) steps on one CPU worker.

    python benchmarks/zero3_buffers.py                       # DiT-B/2 (130M), fp32, ~1 min
    python benchmarks/zero3_buffers.py --preset DiT-S/2 --bf16

Prints the bytes of each partitioned structure of DeepSpeed's stage-3 optimizer (the low-precision partition
buffer, the fp32 master partition, the gradient partition, Adam's state) per parameter, and whether the
fp32 master partition shares storage with the partition the module computes with. In fp32 on CPU it does not
(DeepSpeed compares the partition's torch.device with its device *name*, 'cpu', which is never equal, so it
clones): 20 B per parameter instead of 16 (docs/results.md, large-model fine-tuning).
"""

from __future__ import annotations

import argparse
import os
import resource

import torch


def megabytes(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="DiT-B/2")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    from neon_ray.config import FinetuneConfig
    from neon_ray.models import ModelSpec, get_family
    from neon_ray.runtime.deepspeed import deepspeed_config

    deepspeed.init_distributed("gloo")
    family = get_family("diffusion")(ModelSpec("diffusion", args.preset, (4, 32, 32), 1000))
    torch.manual_seed(0)
    net = family.build().train()
    n = sum(p.numel() for p in net.parameters())
    f = FinetuneConfig(zero_stage=3, workers=1, batch_size=2, lr=1e-4, bf16=args.bf16)
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=f.lr),
                                      config=deepspeed_config(f, 2), dist_init_required=False)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    for _ in range(args.steps):
        x, t, y = torch.randn(2, 4, 32, 32, dtype=dtype), torch.rand(2, dtype=dtype) * 999, torch.randint(0, 1000, (2,))
        engine.backward(engine(x, t, y).float().pow(2).mean())
        engine.step()
    opt = engine.optimizer
    low, master = opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat
    shared = {t.untyped_storage().data_ptr() for t in low} == {t.untyped_storage().data_ptr() for t in master}
    rows = [("partition the module computes with (lp_param_buffer)", megabytes([opt.lp_param_buffer])),
            ("fp32 master partition (fp32_partitioned_groups_flat)", 0.0 if shared else megabytes(master)),
            ("gradient partition (grad_partitions_flat_buffer)", megabytes([opt.grad_partitions_flat_buffer])),
            ("Adam state (exp_avg, exp_avg_sq)", megabytes(v for s in opt.optimizer.state.values() for v in s.values()))]
    print(f"# ZeRO-3 on 1 CPU worker, {args.preset} ({n / 1e6:.1f}M parameters), {'bf16' if args.bf16 else 'fp32'}, "
          f"DeepSpeed {deepspeed.__version__}, torch {torch.__version__}")
    print("| structure | MB | bytes / parameter |\n|---|---|---|")
    for name, mb in rows:
        print(f"| {name} | {mb:.0f} | {mb * 2**20 / n:.1f} |")
    total = sum(mb for _, mb in rows)
    print(f"| total | {total:.0f} | {total * 2**20 / n:.1f} |")
    print(f"fp32 master shares the computing partition's storage: {shared}; process peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
