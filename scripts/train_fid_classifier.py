#!/usr/bin/env python
"""Train the Fashion-MNIST FID feature classifier deterministically and record its test accuracy.

    python scripts/train_fid_classifier.py [--out neon_ray/assets/fmnist_classifier.safetensors]

Writes the safetensors weights and a JSON record (accuracy, seed, epochs, sha256, wall time, host).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time

import torch
from safetensors.torch import save_file

from neon_ray.data import get_dataset
from neon_ray.fid.classifier import accuracy, train_classifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="neon_ray/assets/fmnist_classifier.safetensors")
    ap.add_argument("--data-path", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = get_dataset("fashion_mnist", args.data_path)
    x_train, y_train = ds.load("train")
    x_test, y_test = ds.load("test")
    t0 = time.time()
    net = train_classifier(x_train, y_train, seed=args.seed, epochs=args.epochs)
    wall = time.time() - t0
    acc = accuracy(net, x_test, y_test)
    print(f"test accuracy {acc:.4f} after {wall:.0f} s")
    if acc < 0.90:
        raise SystemExit(f"accuracy {acc:.4f} is below the 0.90 bar; not writing {args.out}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, args.out, metadata={"test_accuracy": f"{acc:.4f}"})
    digest = hashlib.sha256(open(args.out, "rb").read()).hexdigest()
    record = {
        "test_accuracy": round(acc, 4), "seed": args.seed, "epochs": args.epochs, "threads": args.threads,
        "sha256": digest, "train_seconds": round(wall, 1), "torch": torch.__version__,
        "host": f"{platform.machine()} {os.cpu_count()} CPUs", "command": "python " + shlex.join(sys.argv),
    }
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(record, fh, indent=2)
        fh.write("\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
