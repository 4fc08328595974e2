#!/usr/bin/env python
"""The paper's toy (App. B) through the product: best w > 0 for a mode-seeking sampler (ζ = 1.1), < 0 for
a diversity-seeking one (ζ = 0.9), over several seeds. Writes a Markdown table (default docs/toy.md).

    python scripts/toy_experiment.py [--seeds 0 1 2 3 4] [--zetas 1.1 0.9] [--output outputs/toy] [--doc docs/toy.md]

Each (seed, ζ) is one `neon-ray run toy_gaussian` (real Ray stages, DeepSpeed
fine-tune, Tune over w ∈ [−2, 2], MLflow). Per seed the base model is pretrained once (on that seed's
1k real samples) and shared by both ζ, so the two rows of a seed differ only in the sampler.
Finished runs are skipped on rerun (stage manifests), so the script resumes where it stopped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "neon_ray" / "configs" / "toy_gaussian.yaml"


def run_one(seed: int, zeta: float, out: Path, base_checkpoint: Path | None, extra: list[str]) -> dict:
    cmd = [str(Path(sys.executable).with_name("neon-ray")), "run", str(CONFIG), "--output", str(out),
           "--set", f"seed={seed}", "--set", f"data.options.seed={seed}", "--set", f"sampler.score_scale={zeta}"]
    if base_checkpoint is not None:
        cmd += ["--set", f"model.checkpoint={base_checkpoint}"]
    for item in extra:
        cmd += ["--set", item]
    print(f"[toy] seed {seed} ζ {zeta}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"run failed: seed {seed} ζ {zeta} (exit {proc.returncode})")
    summary = json.loads((out / "summary.json").read_text())
    print(f"[toy] seed {seed} ζ {zeta}: FD base {summary['fid_base']:.4f} → {summary['fid_neon']:.4f} at w = {summary['best_w']:g} "
          f"({time.time() - t0:.0f} s)", flush=True)
    return summary


def table(rows: list[tuple[int, float, dict]]) -> str:
    ws = sorted({t["w"] for _, _, s in rows for t in s["trials"]})
    head = "| seed | ζ | FD base (w = 0) | best w | FD at best w | " + " | ".join(f"w={w:g}" for w in ws) + " |"
    lines = [head, "|" + "---|" * (5 + len(ws))]
    for seed, zeta, s in rows:
        by_w = {t["w"]: t["fid"] for t in s["trials"]}
        cells = [f"**{by_w[w]:.4f}**" if w == s["best_w"] else f"{by_w[w]:.4f}" if w in by_w else "" for w in ws]
        lines.append(f"| {seed} | {zeta:g} | {s['fid_base']:.4f} | {s['best_w']:g} | {s['fid_neon']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[tuple[int, float, dict]]) -> str:
    out = []
    for zeta in sorted({z for _, z, _ in rows}, reverse=True):
        best = [s["best_w"] for _, z, s in rows if z == zeta]
        want = "> 0" if zeta > 1 else "< 0" if zeta < 1 else "≈ 0"
        ok = all(w > 0 for w in best) if zeta > 1 else all(w < 0 for w in best) if zeta < 1 else True
        out.append(f"- ζ = {zeta:g}: best w = {', '.join(f'{w:g}' for w in best)} — expected {want} in every seed: "
                   f"**{'yes' if ok else 'no'}**")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--zetas", type=float, nargs="+", default=[1.1, 0.9])
    ap.add_argument("--output", default="outputs/toy")
    ap.add_argument("--doc", default="docs/toy.md")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra config override for every run")
    args = ap.parse_args()
    root = Path(args.output).resolve()
    rows = []
    t0 = time.time()
    for seed in args.seeds:
        base = None
        for zeta in args.zetas:
            out = root / f"seed{seed}-zeta{zeta:g}"
            summary = run_one(seed, zeta, out, base, args.extra)
            rows.append((seed, zeta, summary))
            if base is None and (out / "pretrain" / "model.safetensors").exists():
                base = out / "pretrain" / "model.safetensors"
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    overrides = "".join(f" --set {e}" for e in args.extra)
    doc.write_text(
        "# The paper's toy through neon-ray (App. B)\n\n"
        f"Produced by `python scripts/toy_experiment.py --seeds {' '.join(map(str, args.seeds))} "
        f"--zetas {' '.join(f'{z:g}' for z in args.zetas)}{overrides}` on {dt.date.today().isoformat()} "
        f"({(time.time() - t0) / 60:.0f} min on {os.cpu_count()} CPU cores), config `neon_ray/configs/toy_gaussian.yaml`.\n\n"
        "Target N(0, [[2, 1], [1, 2]]); an MLP DDPM (4 blocks × 32 units) pretrained on 1k real samples of the seed; S = 1k "
        "samples of the ζ-scaled 20-step sampler; a DeepSpeed fine-tune on S; θ_neon = θ_base − w·(θ_ft − θ_base) swept by "
        "Ray Tune over w ∈ [−2, 2]; every θ scored by the closed-form Fréchet distance between the Gaussian fit of 200k of its samples "
        "(the same seeds for every w) and the target's statistics (10⁶ samples).\n\n"
        "**Scoring sampler.** S is drawn with the ζ-scaled sampler, but every θ_w is scored with the plain "
        "ζ = 1 sampler (`evaluate.sampler: {score_scale: 1.0}`): the experiment asks whether the *model* moved "
        "towards or away from the target. Scored with the same ζ-scaled sampler, Neon also learns to undo that "
        "sampler's bias, and the best w comes out > 0 for both ζ (we measured seed 0 with DDIM: ζ = 0.9 → best "
        "w = 1.5), which says nothing about the sign question.\n\n"
        + table(rows) + "\n\n" + verdict(rows) + "\n")
    print(doc.read_text())


if __name__ == "__main__":
    main()
