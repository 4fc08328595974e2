"""What each searcher costs against the full grid, on the quickstart base, side by side in one run.

    python benchmarks/search_cost.py [--out outputs/search_cost] [--set key=value ...]

One output holds generate + finetune (+ evaluate) of `jobs/configs/quickstart.yaml`; each search then runs
`neon-ray tune` on its own copy of that output (outputs are relocatable), so every search scores the same
θ_base and θ_ft with the same evaluation seeds. Searches: the full grid (9 w × 4 γ, one rung at the full n),
the same grid under ASHA with rungs, Optuna's TPE and the bracket searcher (both with rungs). Prints per
search: trials, images sampled + scored (the cost unit), wall seconds, the pick (w, γ) and its FID rescored
at the full n on `tune.final_seeds` fresh seed sets, with the real-vs-real floor. The target: one searcher's
rescored FID within the floor of the grid's at ≤ 25% of the grid's images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs" / "configs" / "quickstart.yaml"
W_GRID = "[0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25]"
GAMMAS = "[1.5, 2.0, 2.5, 3.0]"
SEARCHES = {
    "grid (full n)": ["tune.search=grid", f"tune.space={{w: {{choice: {W_GRID}}}, guidance: {{choice: {GAMMAS}}}}}", "tune.rungs=[]",
                      "tune.scheduler=fifo"],
    "grid + ASHA": ["tune.search=grid", f"tune.space={{w: {{choice: {W_GRID}}}, guidance: {{choice: {GAMMAS}}}}}",
                    "tune.rungs=[500, 1000, 2000]", "tune.scheduler=asha"],
    "optuna + ASHA": ["tune.search=optuna", "tune.num_trials=16", f"tune.space={{w: {{low: 0.1, high: 1.25}}, guidance: {{choice: {GAMMAS}}}}}",
                      "tune.rungs=[500, 1000, 2000]", "tune.scheduler=asha"],
    "bracket": ["tune.search=bracket", "tune.bracket_steps=4", f"tune.space={{w: {{low: 0.1, high: 1.25}}, guidance: {{choice: {GAMMAS}}}}}",
                "tune.rungs=[500, 2000]", "tune.scheduler=fifo"],
}


def neon_ray(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "neon_ray", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc


def sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/search_cost")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="overrides for every run (key=value)")
    parser.add_argument("--only", action="append", default=[], help="run only these searches (by name)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    common = sets(["evaluate.num_samples=2000", "tune.final_seeds=3", "mlflow.enabled=false", *args.extra])
    shared = out / "shared"
    for stage in ("generate", "finetune", "evaluate"):
        neon_ray(stage, str(CONFIG), "--output", str(shared), *common)
    rows = []
    for name, overrides in SEARCHES.items():
        if args.only and name not in args.only:
            continue
        where = out / name.replace(" ", "_").replace("+", "").replace("(", "").replace(")", "")
        if not (where / "tune" / "manifest.json").exists():
            shutil.rmtree(where, ignore_errors=True)
            shutil.copytree(shared, where, symlinks=True)
        t0 = time.time()
        neon_ray("tune", str(CONFIG), "--output", str(where), *common, *sets(overrides))
        wall = time.time() - t0
        m = json.loads((where / "tune" / "manifest.json").read_text())["metrics"]
        final = m["final"]
        rows.append({"search": name, "trials": len(m["trials"]), "images": m["images_scored"], "seconds": wall,
                     "w": m["best_w"], "sampler": m["best_sampler"], "fid": final["neon"]["fid_mean"], "sd": final["neon"]["fid_sd"],
                     "base": final["base"]["fid_mean"], "base_sampler": final["base"]["sampler"], "floor": final["neon"]["fid_floor"]})
    grid = next((r for r in rows if r["search"] == "grid (full n)"), None)
    print("| search | trials | images sampled + scored | % of grid | wall s | pick (w, γ) | Neon FID (rescored) | base FID at its best γ | floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = f"{100 * r['images'] / grid['images']:.0f}%" if grid else "n/a"
        print(f"| {r['search']} | {r['trials']} | {r['images']:,} | {share} | {r['seconds']:.0f} | {r['w']:.3g}, {r['sampler']} | "
              f"{r['fid']:.3f} ± {r['sd']:.3f} | {r['base']:.3f} ({r['base_sampler']}) | {r['floor']:.3f} |")


if __name__ == "__main__":
    main()
