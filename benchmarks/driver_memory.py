"""The driver's resident memory while the product scores sample sets of n, 2n, 4n, 8n samples.

    python benchmarks/driver_memory.py [--n 2600] [--steps 4] [--size 128] [--json]   # largest set ≥ 1 GB
    python benchmarks/driver_memory.py --in-memory [...]   # the same sets read whole into the driver first
    python benchmarks/driver_memory.py --n 200 --steps 3 --json                         # the script itself, ~1 min

The sets are random-noise RGB images (so that PNG does not shrink them), written through the product's
own writer (`runtime.sampling.write_part`, the parts `generate` writes) into `--out` once and reused by
later runs: the set of n samples is the first n/part parts (hard links). Each set is scored by the
product's path (`scoring.score_samples`: `open_samples` lists the parts, the feature actors read them),
or with `--in-memory` by the path every set took before sets were streamed (the whole set read into one
in-memory part on the driver, its rows shipped to the actors). The extractor is the parameter-free
`pixel-pool` (4×4-pooled pixels): what is measured is the data path, not a network.

After one untimed pass over the smallest set (one-time allocations are not growth with n), a thread samples
this process's RSS every 10 ms during each scoring call. Prints per n: raw pixel bytes,
bytes of the set as stored, the driver's peak RSS, FID against a fixed noise reference, samples/s; then
the growth of the peak from the smallest to the largest n against 10% of the largest set's stored bytes
(the target). With `--json`, one JSON object per line instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Self

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neon_ray.config import load_config

STREAM = "driver-memory"


class PeakRSS:
    """The peak resident memory of this process while the block runs, sampled by a thread."""

    def __init__(self, every_s: float = 0.01):
        import psutil

        self.process, self.every_s, self.peak = psutil.Process(), every_s, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.every_s)

    def __enter__(self) -> Self:
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def noise(seed: int, index: np.ndarray, size: int) -> np.ndarray:
    """uint8 (B, 3, size, size) noise, image i keyed by (seed, stream, i)."""
    from neon_ray.runtime.seeds import derive_seed

    return np.stack([np.random.default_rng(derive_seed(seed, STREAM, int(i))).integers(0, 256, (3, size, size), np.uint8)
                     for i in index])


def write_parts(dest: Path, n: int, part: int, size: int, seed: int) -> list[Path]:
    """Parts of `part` samples covering 0..n-1 under dest, through the product's writer (existing parts are kept)."""
    from neon_ray.data.codec import CODECS
    from neon_ray.runtime.sampling import part_uri, write_part

    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, n, part):
        uri = Path(part_uri(str(dest), start))
        if not uri.exists():
            idx = np.arange(start, min(n, start + part))
            write_part(str(uri), CODECS["image"], idx, idx % 10, idx, noise(seed, idx, size))
        paths.append(uri)
    return paths


def linked_set(parts: list[Path], dest: Path) -> Path:
    """A set of the given parts (hard links: no copy)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in parts:
        if not (dest / p.name).exists():
            os.link(p, dest / p.name)
    return dest


def reference_of(cfg, n: int, size: int):
    """Statistics of n noise images of another seed (in memory: a dataset-split-like set)."""
    from neon_ray.data.codec import CODECS
    from neon_ray.runtime.samplesets import encoded_set
    from neon_ray.scoring import features_of

    images = noise(cfg.evaluate.seed + 1, np.arange(n), size)
    return features_of(cfg, encoded_set(images, None, CODECS["image"], "noise reference")).stats


def score(cfg, uri: str, reference, in_memory: bool) -> tuple[dict, int, float]:
    """(scores, the driver's peak RSS in bytes, seconds) of one scoring call."""
    from neon_ray.runtime.samplesets import in_memory as read_whole
    from neon_ray.runtime.samplesets import open_samples
    from neon_ray.scoring import score_samples, score_set

    gc.collect()
    with PeakRSS() as rss:
        t0 = time.time()
        scores = score_set(cfg, read_whole(open_samples(uri)), reference) if in_memory else score_samples(cfg, uri, reference)
        seconds = time.time() - t0
    return scores, rss.peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2600, help="the smallest set (a multiple of --part)")
    parser.add_argument("--steps", type=int, default=4, help="sets of n, 2n, ... 2^(steps-1) n")
    parser.add_argument("--size", type=int, default=128, help="image side (RGB)")
    parser.add_argument("--part", type=int, default=200, help="samples per Parquet part")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "driver_memory"))
    parser.add_argument("--in-memory", action="store_true", help="read each set whole into the driver first (the old path)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    cfg = load_config("tiny", [
        "evaluate.extractor=pixel-pool", "evaluate.prc=false", "evaluate.floor=false", f"evaluate.actors={args.cpus}",
        "evaluate.cpus_per_actor=0.5", "evaluate.feature_batch_size=500", "mlflow.enabled=false"], args.out)
    sizes = [args.n * 2**k for k in range(args.steps)]
    out = Path(args.out)
    parts = write_parts(out / "parts", sizes[-1], args.part, args.size, cfg.evaluate.seed)
    reference = reference_of(cfg, 1000, args.size)
    # One untimed pass first: what the first pass allocates once (imports, Ray Data's executor) is not growth with n.
    score(cfg, str(linked_set([p for p in parts if int(p.stem.split("-")[1]) < sizes[0]], out / f"n{sizes[0]}")), reference,
          args.in_memory)
    rows = []
    for n in sizes:
        mine = [p for p in parts if int(p.stem.split("-")[1]) < n]
        uri = linked_set(mine, out / f"n{n}")
        scores, peak, seconds = score(cfg, str(uri), reference, args.in_memory)
        row = {"path": "in-memory" if args.in_memory else "streamed", "n": n, "image_bytes": n * 3 * args.size**2,
               "encoded_bytes": sum(p.stat().st_size for p in mine), "parts": len(mine),
               "driver_peak_rss_mb": round(peak / 2**20, 1), "fid": scores["fid"], "seconds": round(seconds, 2),
               "samples_per_s": round(n / seconds, 1)}
        rows.append(row)
        print(json.dumps(row) if args.json else
              f"{row['path']:>9} n={n:>6}  pixels {row['image_bytes'] / 1e9:6.3f} GB  stored {row['encoded_bytes'] / 1e9:6.3f} GB  "
              f"driver peak {row['driver_peak_rss_mb']:8.1f} MB  FID {row['fid']:.6f}  {row['samples_per_s']:7.1f} samples/s", flush=True)
    growth = rows[-1]["driver_peak_rss_mb"] - rows[0]["driver_peak_rss_mb"]
    bound = 0.1 * rows[-1]["encoded_bytes"] / 2**20
    summary = {"summary": True, "path": rows[0]["path"], "peak_growth_mb": round(growth, 1), "bound_mb": round(bound, 1),
               "within_bound": growth <= bound}
    print(json.dumps(summary) if args.json else
          f"driver peak grew {growth:.1f} MB from n={sizes[0]} to n={sizes[-1]}; target ≤ {bound:.1f} MB "
          f"(10% of the largest set's stored bytes): {'met' if growth <= bound else 'NOT met'}")
    ray.shutdown()


if __name__ == "__main__":
    main()
