"""The CPU training workers' glibc settings (runtime/ray_train.py host_memory_env: 128 KiB for models of
≥ 100M parameters, 4 MiB for smaller ones), against glibc's default, side by side in one run:

    python benchmarks/host_allocator.py [--steps 20] [--large-preset DiT-XL/2]

Per setting, in fresh processes: (1) training images/s of the quickstart's U-Net (batch 32, one thread, AdamW),
where every activation is allocated and freed each step; (2) resident memory after a large model is built
whole, half of each weight kept and the whole freed (what ZeRO-3 partitioning does), after one earlier large
free (which raises glibc's dynamic mmap threshold when none is fixed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import time, torch
from neon_ray.config import load_config
from neon_ray.runtime.run_model import family_for, spec_of
torch.set_num_threads(1)
torch.manual_seed(0)
family = family_for(spec_of(load_config("quickstart", [], "/tmp/unused")))
net = family.build()
opt = torch.optim.AdamW(net.parameters(), 1e-4)
x, y, g = torch.rand(32, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (32,)), torch.Generator().manual_seed(0)
def step():
    loss = family.training_loss(net, x, y, g)
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(3):
    step()
t0 = time.perf_counter()
for _ in range({steps}):
    step()
print(32 * {steps} / (time.perf_counter() - t0))
"""

PARTITION = """
import gc, psutil, torch
from neon_ray.models import ModelSpec
from neon_ray.runtime.run_model import family_for
family = family_for(ModelSpec(family="diffusion", preset="{preset}", image_shape=(4, 32, 32), num_classes=1000, options={{}}))
scratch = torch.empty(30 << 18); del scratch  # one 30 MB free first
net = family.build()
built = psutil.Process().memory_info().rss
half = [p.detach().flatten()[: p.numel() // 2].clone() for p in net.parameters()]
del net; gc.collect()
print(built / 2**20, psutil.Process().memory_info().rss / 2**20)
"""


def run(code: str, env: dict[str, str]) -> list[float]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), full.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True, check=True)
    return [float(v) for v in out.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--large-preset", default="DiT-XL/2")
    args = parser.parse_args()
    from neon_ray.runtime.ray_train import LARGE_MODEL_PARAMETERS, host_memory_env

    settings = {"glibc default": {}, "large models: 128 KiB": host_memory_env(LARGE_MODEL_PARAMETERS),
                "small models: 4 MiB": host_memory_env(0)}
    print(f"| worker setting | U-Net training img/s (1 thread) | {args.large_preset}: RSS built whole (MB) | after partitioning (MB) |")
    print("|---|---|---|---|")
    for name, env in settings.items():
        (speed,) = run(TRAIN.format(steps=args.steps), env)
        built, after = run(PARTITION.format(preset=args.large_preset), env)
        print(f"| {name} | {speed:.1f} | {built:.0f} | {after:.0f} |")


if __name__ == "__main__":
    main()
