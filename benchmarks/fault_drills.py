"""Fault drills: kill parts of a running `neon-ray run` and check that nothing is lost.

    python benchmarks/fault_drills.py [--config neon_ray/configs/tiny.yaml] [--set KEY=VALUE ...] [--out DIR]

Runs the config once undisturbed, then once while killing (kill -9) one sampling actor mid-generate,
one Ray Train worker mid-finetune and one Tune trial's process mid-tune, then once more killing the
driver itself mid-finetune and rerunning the same command. Prints a table:

    drill | recovered? | seconds lost | outputs identical?

where "identical" means: the synthetic set S holds the same sample indices and bytes, θ_base and θ_ft
match the undisturbed run (max |Δ| ≤ 1e-6), and the FID table (FID per w, and the base's) is the same.
`tests/test_faults.py` runs the same drills on the tiny config.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every stage long enough to be hit mid-way, and checkpoints often enough to resume from.
DRILL_SETTINGS = ["generate.num_samples=60", "generate.batch_size=5", "finetune.budget_images=320",
                  "finetune.checkpoint_every=10", "pretrain.checkpoint_every=10", "evaluate.floor=false"]


@dataclass
class Kill:
    """Kill the first process matching `process` (a substring of its command line, among the driver's
    descendants) once `ready(output)` holds."""

    name: str
    process: str
    ready: object
    done_at: float | None = None
    pid: int | None = None


@dataclass
class Outcome:
    returncode: int
    seconds: float
    log: str
    kills: list[Kill] = field(default_factory=list)


def _exists(pattern: str):
    return lambda out: any(out.glob(pattern))


def _before(stage: str, pattern: str):
    """True once `pattern` exists under the output and `stage` has not finished (its manifest is absent)."""
    return lambda out: any(out.glob(pattern)) and not (out / stage / "manifest.json").exists()


def standard_kills() -> list[Kill]:
    return [
        Kill("sampling actor, mid-generate", "MapWorker(MapBatches(SamplerActor", _before("generate", "generate/samples/part-*.parquet")),
        Kill("Ray Train worker, mid-finetune", "RayTrainWorker", _before("finetune", "finetune/ray/*/checkpoint_*")),
        Kill("Tune trial, mid-tune", "ImplicitFunc", _before("tune", "tune/trials/*/samples/part-*.parquet")),
    ]


def neon_ray(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("neon-ray")
    return [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "neon_ray"]), *args]


def _env() -> dict:
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [str(ROOT)]), "MLFLOW_TRACKING_URI": ""}


def _descendant(pid: int, needle: str):
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if needle in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def run(config: Path, output: Path, sets: list[str], kills: list[Kill] = (), kill_driver_when=None, timeout: float = 1500) -> Outcome:
    """`neon-ray run` as a subprocess; a watcher kills the listed processes (or the driver) when their moment comes."""
    cmd = neon_ray("run", str(config), "--output", str(output), *[a for s in sets for a in ("--set", s)])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    t0 = time.time()
    pending = list(kills)
    while proc.poll() is None and time.time() - t0 < timeout:
        if kill_driver_when is not None and kill_driver_when(output):
            proc.send_signal(signal.SIGKILL)
            kill_driver_when = None
        for kill in list(pending):
            if kill.ready(output) and (victim := _descendant(proc.pid, kill.process)) is not None:
                victim.send_signal(signal.SIGKILL)
                kill.pid, kill.done_at = victim.pid, time.time() - t0
                pending.remove(kill)
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    reader.join(10)
    return Outcome(proc.returncode, time.time() - t0, "".join(log), list(kills))


# ----------------------------------------------------------------------------------------------
# Comparing two outputs


def same_samples(a: Path, b: Path) -> bool:
    from neon_ray.runtime.samplesets import read_samples

    ta, tb = read_samples(str(a)), read_samples(str(b))
    return all(ta.column(c).to_pylist() == tb.column(c).to_pylist() for c in ("index", "label", "seed", "png"))


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    assert set(x) == set(y)
    return max(float((x[k].double() - y[k].double()).abs().max()) if x[k].numel() else 0.0 for k in x)


def fid_table(output: Path) -> dict:
    summary = json.loads((output / "summary.json").read_text())
    return {"base": summary["fid_base"], **{t["w"]: t["fid"] for t in summary["trials"]}}


def compare(reference: Path, other: Path, tolerance: float = 1e-6) -> dict:
    base = "pretrain/model.safetensors"
    checks = {
        "S": same_samples(reference / "generate" / "samples", other / "generate" / "samples"),
        # (a run from the reference's saved base pretrains nothing: its θ_base is the reference's by construction)
        "θ_base": not ((reference / base).exists() and (other / base).exists()) or max_abs_diff(reference / base, other / base) <= tolerance,
        "θ_ft": max_abs_diff(reference / "finetune/model.safetensors", other / "finetune/model.safetensors") <= tolerance,
        "FID table": fid_table(reference) == fid_table(other),
    }
    return checks


def drills(config: Path, out: Path, sets: list[str], undisturbed: tuple[Path, Outcome] | None = None,
           from_its_base: bool = False) -> list[dict]:
    """All drills; returns one row per drill. `undisturbed`: an undisturbed run of the same config and settings
    already made (its output folder and outcome), else one is made first under `out`. `from_its_base`: the
    disturbed runs start from the undisturbed run's θ_base (model.checkpoint) instead of pretraining it again
    (no drill kills the pretrain stage; the tests use this to save two pretrains)."""
    rows = []
    if undisturbed is None:
        undisturbed = (out / "undisturbed", run(config, out / "undisturbed", sets))
    clean, reference = undisturbed
    assert reference.returncode == 0, reference.log[-3000:]
    if from_its_base and (clean / "pretrain" / "model.safetensors").exists():
        sets = [*sets, f"model.checkpoint={clean / 'pretrain' / 'model.safetensors'}"]
    disturbed = run(config, out / "disturbed", sets, kills=standard_kills())
    checks = compare(clean, out / "disturbed") if disturbed.returncode == 0 else {}
    for kill in disturbed.kills:
        rows.append({"drill": kill.name, "killed": kill.pid is not None, "recovered": disturbed.returncode == 0,
                     "seconds_lost": round(disturbed.seconds - reference.seconds, 1), "identical": all(checks.values()) if checks else False,
                     "checks": checks})
    first = run(config, out / "driver", sets, kill_driver_when=_before("finetune", "finetune/ray/*/checkpoint_manager_snapshot.json"))
    again = run(config, out / "driver", sets)
    checks = compare(clean, out / "driver") if again.returncode == 0 else {}
    rows.append({"drill": "driver, mid-finetune, then the same command again", "killed": first.returncode != 0,
                 "recovered": again.returncode == 0 and "resuming at step" in again.log,
                 "seconds_lost": round(first.seconds + again.seconds - reference.seconds, 1),
                 "identical": all(checks.values()) if checks else False, "checks": checks, "log": again.log})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "neon_ray/configs/tiny.yaml"))
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--out", default="outputs/fault_drills")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    rows = drills(Path(args.config), out, DRILL_SETTINGS + args.sets)
    print(f"# fault drills on {Path(args.config).name} ({' '.join(args.sets) or 'drill settings'}), {os.cpu_count()} CPUs")
    print("| drill | recovered? | seconds lost | outputs identical? |")
    print("|---|---|---|---|")
    for r in rows:
        detail = ", ".join(f"{k} {'=' if v else '≠'}" for k, v in r["checks"].items())
        print(f"| {r['drill']} | {'yes' if r['recovered'] and r['killed'] else 'NO'} | {r['seconds_lost']:+.1f} | "
              f"{'yes' if r['identical'] else 'NO'} ({detail}) |")


if __name__ == "__main__":
    main()
