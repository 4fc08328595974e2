#!/usr/bin/env python
"""Sampling throughput of the built-in families and presets on this machine (prints a table).

    python benchmarks/sampling.py [--batch 250] [--steps 10] [--threads N] [--presets unet-tiny,unet-p2s]

Measures images/s of the sampler itself (one process, CFG γ = 2: conditional and unconditional
passes batched into one forward), in fp32 and under bf16 autocast, plus network forwards/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from neon_ray.models import ModelSpec, get_family
from neon_ray.training import sample_seeds


def bench(preset: str, batch: int, steps: int, bf16: bool, device: str) -> tuple[float, float]:
    family = get_family("diffusion")(ModelSpec("diffusion", preset, (1, 28, 28), 10))
    net = family.build().to(device).eval()
    settings = family.sampler_schema(steps=steps, guidance=2.0)
    labels = torch.arange(batch, device=device) % 10
    seeds = sample_seeds(0, "bench", range(batch))
    with torch.autocast(device if device != "cpu" else "cpu", dtype=torch.bfloat16, enabled=bf16):
        family.sample(net, labels[:8], seeds[:8], settings)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        family.sample(net, labels, seeds, settings)
        if device == "cuda":
            torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return batch / dt, batch * steps * 2 / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--presets", default="unet-tiny,unet-p2s,unet-small")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, {args.threads} threads"
    print(f"# diffusion sampling, DDIM {args.steps} steps, CFG 2, batch {args.batch}, {device} ({name}), torch {torch.__version__}")
    print(f"| preset | params | precision | images/s | network forwards/s |")
    print(f"|---|---|---|---|---|")
    for preset in args.presets.split(","):
        params = sum(p.numel() for p in get_family("diffusion")(ModelSpec("diffusion", preset, (1, 28, 28), 10)).build().parameters())
        for bf16 in (False, True):
            ips, fps = bench(preset, args.batch, args.steps, bf16, device)
            print(f"| {preset} | {params / 1e6:.2f}M | {'bf16' if bf16 else 'fp32'} | {ips:.1f} | {fps:.0f} |")


if __name__ == "__main__":
    main()
