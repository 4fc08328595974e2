#!/usr/bin/env python
"""Train the small multi-scale VQ-VAE the VAR family's Fashion-MNIST presets read (var-tiny, var-fmnist-cpu).

    python scripts/train_var_tokenizer.py [--out neon_ray/configs/checkpoints/var-vq-fmnist.safetensors]

The architecture is `vq-fmnist` of neon_ray/models/var_vqvae.py (28×28 grayscale → 7×7 maps of 16-dim codes,
512 codes, scales 1, 2, 3, 4, 5, 7). Objective: L1 reconstruction + the release's multi-scale VQ loss (codebook
and φ toward the encoder's features, β = 0.25 commitment); no perceptual or adversarial loss (VAR's tokenizer
training code is not released). The codebook starts from encoder features, and codes unused over a window of
steps are restarted at features of the current batch, so that the 512 codes stay in use. Writes the safetensors
(with the tokenizer name and scale list in its metadata) and a JSON record (losses, code usage, seed, sha256,
wall time, host).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from neon_ray.data import get_dataset
from neon_ray.models.var import PN_FMNIST
from neon_ray.models.var_vqvae import TOKENIZERS, VQVAE

NAME = "vq-fmnist"


def features(vq: VQVAE, x: torch.Tensor) -> torch.Tensor:
    """Encoder features of x at the finest scale, one row per position: (B·7·7, Cvae)."""
    f = vq.quant_conv(vq.encoder(x))
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


@torch.no_grad()
def evaluate(vq: VQVAE, x: torch.Tensor) -> tuple[float, float]:
    """(reconstruction L1 through the whole pyramid, fraction of codes used) on the images x."""
    idx = vq.encode_indices(x)
    f_hat = torch.zeros(x.shape[0], vq.cfg.z, PN_FMNIST[-1], PN_FMNIST[-1])
    for k, r in enumerate(idx):
        f_hat, _ = vq.next_input(k, f_hat, r)
    used = torch.cat(idx, 1).unique().numel() / vq.cfg.vocab
    return (vq.decode(f_hat) - x).abs().mean().item(), used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="neon_ray/configs/checkpoints/var-vq-fmnist.safetensors")
    ap.add_argument("--data-path", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--restart-every", type=int, default=50, help="steps between restarts of unused codes")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ds = get_dataset("fashion_mnist", args.data_path)
    x_train, _ = ds.load("train")
    x_test, _ = ds.load("test")
    to_float = lambda a: torch.from_numpy(a).float() / 127.5 - 1  # noqa: E731  uint8 → [−1, 1]
    x_train, x_test = to_float(x_train), to_float(x_test[:1000])
    vq = VQVAE(TOKENIZERS[NAME], PN_FMNIST).train()
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # codebook from encoder features of random images (k-means++-free data init)
        feats = features(vq, x_train[torch.randint(len(x_train), (256,), generator=g)])
        vq.quantize.embedding.weight.copy_(feats[torch.randperm(len(feats), generator=g)[: vq.cfg.vocab]])
    opt = torch.optim.Adam(vq.parameters(), lr=args.lr)
    hits = torch.zeros(vq.cfg.vocab)
    t0, log = time.time(), []
    for step in range(args.steps):
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x = x_train[torch.randint(len(x_train), (args.batch_size,), generator=g)]
        rec, vq_loss, idx = vq(x)
        rec_loss = (rec - x).abs().mean()
        loss = rec_loss + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            hits += torch.cat(idx, 1).flatten().bincount(minlength=vq.cfg.vocab).float()
            if (step + 1) % args.restart_every == 0 and step + 1 < args.steps * 0.9:
                dead = (hits == 0).nonzero().flatten()
                if len(dead):
                    feats = features(vq, x)
                    pick = torch.randint(len(feats), (len(dead),), generator=g)
                    vq.quantize.embedding.weight[dead] = feats[pick] + 0.01 * torch.randn(len(dead), vq.cfg.z, generator=g)
                hits.zero_()
        if step % 50 == 0 or step == args.steps - 1:
            line = dict(step=step, rec_l1=round(rec_loss.item(), 4), vq=round(vq_loss.item(), 4), s=round(time.time() - t0))
            log.append(line)
            print(json.dumps(line), flush=True)
    wall = time.time() - t0
    vq.eval()
    test_l1, used = evaluate(vq, x_test)
    print(f"test reconstruction L1 {test_l1:.4f} (images in [-1, 1]), codes used {used:.1%}, {wall:.0f} s")
    state = {k: v.detach().contiguous() for k, v in vq.state_dict().items()}
    meta = {"tokenizer": NAME, "patch_nums": "_".join(map(str, PN_FMNIST)), "test_l1": f"{test_l1:.4f}"}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    save_file(state, args.out, metadata=meta)
    digest = hashlib.sha256(open(args.out, "rb").read()).hexdigest()
    record = {
        "tokenizer": NAME, "patch_nums": list(PN_FMNIST), "test_l1": round(test_l1, 4), "codes_used": round(used, 4),
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads,
        "sha256": digest, "train_seconds": round(wall, 1), "torch": torch.__version__,
        "host": f"{platform.machine()} {os.cpu_count()} CPUs", "command": "python " + shlex.join(sys.argv), "log": log,
    }
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(record, fh, indent=2)
        fh.write("\n")
    print(json.dumps({k: v for k, v in record.items() if k != "log"}))


if __name__ == "__main__":
    main()
