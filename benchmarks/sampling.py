#!/usr/bin/env python
"""Sampling throughput of every model family and preset on this machine (prints a table).

    python benchmarks/sampling.py [--families diffusion,edm,flow,autoregressive,fewstep,toy-ddpm]
                                  [--presets unet-p2s,dit-tiny] [--batch 64] [--steps 10]
                                  [--device cpu|cuda] [--compile] [--threads N]
    python benchmarks/sampling.py --families diffusion --presets DiT-XL/2 --batch 256 --device cuda --compile   # on a GPU

Measures samples/s of each family's own sampler (one process, CFG γ = 2 where the family has CFG:
conditional and unconditional rows batched into one forward) and network forwards/s (rows through the
network per second, both CFG halves counted), in fp32 and under bf16 autocast. Samplers: diffusion
DDIM, edm Heun (NFE = 2·steps − 1), flow Heun (NFE = 2·steps), autoregressive top-p 0.95 with a KV
cache (NFE = one single-token forward per token: 784 on Fashion-MNIST), fewstep consistency sampling in
1, 2, 4 and 8 steps, imm pushforward in 8, 4, 2 and 1 steps, xar Euler per cluster (NFE = clusters · steps, plus
one context pass per cluster after the first), var next-scale sampling with top-k 900 and top-p 0.95 (NFE = one
forward per scale, the VQ-VAE decode included; VAR-* presets on a randomly initialised vae_ch160v4096z32 unless it
is given), toy-ddpm 20 ancestral steps on 2-D points. Without --presets each family runs its
Fashion-MNIST-sized presets; DiT-* presets run on 4×32×32 latents with 1000 classes (DiT-XL/2 at 256²,
the VAE excluded; IMM-DiT-XL/2-im256 likewise). On CUDA, DiT-XL/2 is compared with the measured H100 ceiling: 1962 forwards/s
(bf16, compiled, batch 256; /work/shared/gpu/README.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch import nn

from neon_ray.models import ModelSpec, get_family
from neon_ray.runtime.seeds import sample_seeds

H100_DIT_XL2_CEILING = 1962.0  # forwards/s of a DiT-XL/2-sized stack, bf16 + torch.compile, batch 256
DENOISER_PRESETS = ["unet-p2s", "dit-tiny", "dit-fmnist-cpu"]
DEFAULT_PRESETS = {"diffusion": DENOISER_PRESETS, "edm": DENOISER_PRESETS, "flow": DENOISER_PRESETS,
                   "autoregressive": ["ar-fmnist"], "fewstep": ["fewstep-fmnist"], "xar": ["xar-tiny", "xar-fmnist-cpu"],
                   "var": ["var-tiny", "var-fmnist-cpu"], "imm": ["imm-fmnist"],
                   "toy-ddpm": ["mlp-paper"]}


def sampler_runs(family: str, steps: int) -> list[dict]:
    """The sampler settings timed for a family (one table row each)."""
    if family == "diffusion":
        return [dict(name="ddim", steps=steps, guidance=2.0)]
    if family in ("edm", "flow"):
        return [dict(name="heun", steps=steps, guidance=2.0)]
    if family == "autoregressive":
        return [dict(top_p=0.95, guidance=2.0)]
    if family == "fewstep":
        return [dict(steps=k, guidance=2.0) for k in (1, 2, 4, 8)]
    if family == "xar":
        return [dict(name="euler", steps=steps, guidance=2.0)]  # steps per cluster
    if family == "var":
        return [dict(guidance=2.0, top_k=900, top_p=0.95)]  # one forward per scale (steps do not apply)
    if family == "imm":
        return [dict(steps=k, guidance=2.0) for k in (8, 4, 2, 1)]  # pushforward; 8 steps (Neon's IMM setting) first
    if family == "toy-ddpm":
        return [dict(name="ancestral", steps=20)]
    raise SystemExit(f"--families: no benchmark settings for {family!r}")


def describe(settings: dict) -> str:
    return settings.get("name") or ("top-p 0.95" if "top_p" in settings else f"{settings['steps']}-step")


class Counting(nn.Module):
    """Counts the rows that pass through the network (eager, so it also wraps a compiled network)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x, *args, **kwargs):
        self.rows += x.shape[0]
        return self.net(x, *args, **kwargs)

    def new_cache(self):  # the autoregressive samplers ask their network for a KV cache
        return self.net.new_cache()

    @property
    def seq_len(self) -> int:
        return self.net.seq_len

    def next_scale(self, x, labels, cache):  # VAR samples through this, one forward per scale
        self.rows += labels.shape[0]
        return self.net.next_scale(x, labels, cache)


def spec_for(family: str, preset: str) -> ModelSpec:
    if preset.startswith("DiT-"):
        return ModelSpec(family, preset, (4, 32, 32), 1000)  # ImageNet-256 latents
    if preset.startswith("IMM-DiT-"):
        return ModelSpec(family, preset, (4, 32, 32), 1000)  # ImageNet-256 SD-VAE latents
    if preset.startswith("IMM-SongUNet-"):
        return ModelSpec(family, preset, (3, 32, 32), 10)  # CIFAR-10 pixels (unconditional)
    if preset.startswith("xAR-"):
        return ModelSpec(family, preset, (16, 16, 16), 1000)  # ImageNet-256 KL-16 latents
    if preset.startswith("VAR-"):
        side = 512 if preset.endswith("s512") else 256
        return ModelSpec(family, preset, (3, side, side), 1000)  # ImageNet images through the official VQ-VAE
    if family.startswith("toy-"):
        return ModelSpec(family, preset, (2,), 1)  # the paper's 2-D toy
    return ModelSpec(family, preset, (1, 28, 28), 10)  # Fashion-MNIST pixels


def bench(family_name: str, preset: str, sampler: dict, batch: int, bf16: bool, device: str, compile: bool, repeats: int) -> dict:
    family = get_family(family_name)(spec_for(family_name, preset))
    if family_name == "var" and family.vae_path is None:  # timing only: the official VQ-VAE's shapes, random weights
        from neon_ray.models.var_vqvae import TOKENIZERS, VQVAE

        family.use_tokenizer(VQVAE(TOKENIZERS[family.hparams["tokenizer"]], family.patch_nums))
    net = family.build().to(device).eval()
    params = sum(p.numel() for p in net.parameters())
    counted = Counting(torch.compile(net) if compile else net)
    settings = family.sampler_schema(**sampler)
    unguided = (0.0,) if family_name == "var" else (0.0, 1.0)  # VAR's official cfg: 0 is conditional only
    cfg_rows = 2 if sampler.get("guidance", 1.0) not in unguided else 1  # rows per sample per forward
    labels = torch.arange(batch, device=device) % family.spec.num_classes
    seeds = sample_seeds(0, "bench", range(batch))
    warm = batch if compile else min(batch, 8)  # a compiled network warms up on the timed shapes
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        family.sample(counted, labels[:warm], seeds[:warm], settings)
        _sync(device)
        times = []
        for _ in range(repeats):  # the fastest of a few runs: a shared machine only ever slows a run down
            counted.rows = 0
            t0 = time.perf_counter()
            family.sample(counted, labels, seeds, settings)
            _sync(device)
            times.append(time.perf_counter() - t0)
    dt = min(times)
    return {"params": params, "nfe": counted.rows // (cfg_rows * batch), "samples_per_s": batch / dt, "forwards_per_s": counted.rows / dt}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(DEFAULT_PRESETS))
    ap.add_argument("--presets", help="comma-separated presets for every family (default: each family's CPU-sized ones)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps / EDM σ levels / flow Heun steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the network (the first call compiles)")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row; the fastest is reported")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    name = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}, {args.threads} threads"
    print(f"# sampling, CFG 2, batch {args.batch}, {args.steps} steps, {args.device} ({name}), torch {torch.__version__}"
          f"{', compiled' if args.compile else ''}, best of {args.repeats}")
    extra = " vs H100 ceiling |" if cuda else ""
    print(f"| family | preset | params | sampler | NFE | precision | samples/s | forwards/s |{extra}")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for family in args.families.split(","):
        presets = args.presets.split(",") if args.presets else DEFAULT_PRESETS.get(family, [])
        for preset in [p for p in presets if p in get_family(family).presets]:
            for sampler in sampler_runs(family, args.steps):
                for precision in args.precisions.split(","):
                    r = bench(family, preset, sampler, args.batch, precision == "bf16", args.device, args.compile, args.repeats)
                    ratio = f" {r['forwards_per_s'] / H100_DIT_XL2_CEILING:.2f}× |" if cuda and preset == "DiT-XL/2" else (" – |" if cuda else "")
                    print(f"| {family} | {preset} | {r['params'] / 1e6:.2f}M | {describe(sampler)} | {r['nfe']} | {precision} | "
                          f"{r['samples_per_s']:.1f} | {r['forwards_per_s']:.0f} |{ratio}", flush=True)


if __name__ == "__main__":
    main()
