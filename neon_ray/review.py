"""`neon-ray review OUTPUT`: a finished (or stopped) run read back from its output alone, any URI.

What it reads: the stage manifests (seconds, the tune stage's trials and pick), `summary.json` (the
headline) and the output's MLflow record (`mlflow.json` names it: the output's own sqlite store, a
remote output's uploaded `mlflow.db`, or a tracking server that $MLFLOW_TRACKING_URI must then name).
Trial status, rung and winner come from the trial runs' tags (`trial.status`, `trial.rung`,
`trial.winner`) when the run logged them, else from the tune manifest: a trial is `completed` when it
was scored at the last rung, `stopped` at its largest rung otherwise, and the winner is the pick
(`best_w`, `best_sampler`). An output of an older neon-ray is reviewed as far as it goes; what is
missing is listed (`missing`). Nothing here writes to the output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import storage
from .errors import NeonError
from .manifest import read_manifest
from .tracking import DB_NAME, STATE_FILE, TRIAL_GRID, redact, trial_key_of_params

STAGES = ("pretrain", "generate", "finetune", "diagnose", "evaluate", "tune", "merge")
HEADLINE = ("fid_base", "fid_neon", "fid_base_sd", "fid_neon_sd", "best_w", "best_sampler", "base_best_sampler", "n_eval",
            "fid_floor")


def review(output: str) -> dict[str, Any]:
    """The run under `output` as one JSON-able record (see the module docstring)."""
    try:
        manifests = {name: m for name in STAGES if (m := read_manifest(output, name)) is not None}
        summary = _read_json(storage.join(output, "summary.json"))
        state = _read_json(storage.join(output, STATE_FILE))
    except NeonError:
        raise
    except Exception as exc:  # noqa: BLE001 - a missing bucket, rejected credentials, an endpoint that does not answer
        raise NeonError(f"review: cannot read {storage.redact_uri(output)}: {storage.describe_storage_error(exc)}") from None
    if not manifests and summary is None and state is None:
        raise NeonError(f"review: no neon-ray output at {storage.redact_uri(output)} (no stage manifest, summary.json or {STATE_FILE})")
    missing: list[str] = []
    tune = manifests.get("tune")
    trials = _trials(tune) if tune else []
    if tune is None:
        missing.append("the tune stage has not finished: no trials, no pick, no registered model")
    registered = _registered(output, tune, summary)
    record = {
        "output": storage.redact_uri(output),
        "parent_run_id": (state or {}).get("parent_run_id"),
        "stages": {name: {"seconds": m.wall_seconds, "finished_at": m.finished_at, "neon_ray_version": m.neon_ray_version}
                   for name, m in manifests.items()},
        "search": {k: tune.params.get(k) for k in ("search", "scheduler", "rungs", "space")} if tune else None,
        "diagnosis": {k: v for k, v in manifests["diagnose"].metrics.items() if k not in ("losses", "loss_at")}
        if "diagnose" in manifests else None,
        "trials": trials,
        "headline": _headline(summary, tune),
        "registered_model": registered,
        "missing": missing,
    }
    if state is None:
        missing.append(f"no MLflow record ({STATE_FILE}): the run was untracked (mlflow.enabled: false) or is older")
    else:
        with _store(output, state, missing) as client:
            if client is not None:
                _add_mlflow(client, state, record, missing)
    if summary is None and tune is not None:
        missing.append("no summary.json: the run stopped before its end; the headline is the search's own pick")
    return record


# ----------------------------------------------------------------------------------------------
# From the manifests


def _read_json(uri: str) -> Any:
    try:
        return storage.read_json(uri) if storage.exists(uri) else None
    except ValueError:
        return None


def _trials(tune) -> list[dict]:
    rungs = [int(n) for n in tune.params.get("rungs") or []]
    best = (tune.metrics.get("best_w"), tune.metrics.get("best_sampler") or {})
    out = []
    for row in tune.metrics.get("trials", []):
        fid = {int(n): v for n, v in row.get("fid_by_n", {}).items()} or ({int(row["n"]): row["fid"]} if "n" in row else {})
        rung = max(fid) if fid else None
        completed = rung is not None and (not rungs or rung >= max(rungs))
        out.append({
            "key": row.get("key"), "grid": None, "run_id": None,  # grid: its sample grid's URI, from its MLflow run
            "params": {"w": row["w"], **{f"sampler.{k}": v for k, v in (row.get("sampler") or {}).items()}},
            "fid": fid, "status": "completed" if completed else "stopped", "rung": rung,
            "winner": (row["w"], row.get("sampler") or {}) == best,
        })
    return out


def _headline(summary: dict | None, tune) -> dict | None:
    if summary is not None:
        head = {k: summary.get(k) for k in HEADLINE}
        head["comparison"] = (summary.get("headline") or {}).get("comparison")
        return head
    if tune is None:
        return None
    return {"fid_neon": tune.metrics.get("best_fid"), "best_w": tune.metrics.get("best_w"),
            "best_sampler": tune.metrics.get("best_sampler"), "n_eval": tune.metrics.get("best_n")}


def _registered(output: str, tune, summary: dict | None) -> dict | None:
    params = tune.params if tune else {}
    if "registered_model" in params:
        return {"name": params["registered_model"], "version": str(params["registered_version"]),
                "alias": params.get("registered_alias"), "uri": _resolve_artifact(output, params.get("registered_uri")),
                "trial_run_id": params.get("registered_trial_run")}
    if summary and summary.get("registered_model"):
        return {"name": summary["registered_model"]["model"], "version": str(summary["registered_model"]["version"]),
                "alias": None, "uri": None, "trial_run_id": None}
    return None


def _resolve_artifact(output: str, path: str | None) -> str | None:
    """A model location recorded relative to the output root, as a URI (a local path for a local output)."""
    if not path:
        return None
    if "://" in path or path.startswith("/"):
        return path
    if storage.is_local(output):
        return os.path.join(os.path.abspath(storage.to_local_path(output)), path)
    return storage.join(output, path)


# ----------------------------------------------------------------------------------------------
# From the MLflow record


@contextlib.contextmanager
def _store(output: str, state: dict, missing: list[str]) -> Iterator[Any]:
    """A client on the output's record: a local copy of its sqlite store (never the store itself: reading must not
    migrate or lock a record a driver may be writing), or the tracking server $MLFLOW_TRACKING_URI names."""
    from mlflow.tracking import MlflowClient

    recorded = state.get("tracking_uri") or ""
    if state.get("store") == "external" and recorded.startswith("sqlite:") and not storage.exists(storage.join(output, DB_NAME)):
        missing.append(f"the MLflow store is {recorded} on the machine that ran it (an older neon-ray kept a remote "
                       "output's record there)")
        yield None
        return
    if state.get("store") == "external":
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            missing.append(f"the MLflow record is on a tracking server ({state.get('tracking_uri')}); set MLFLOW_TRACKING_URI to read it")
            yield None
            return
        yield MlflowClient(tracking_uri=uri)
        return
    with tempfile.TemporaryDirectory(prefix="neon-review-") as tmp:
        db = copy_store(output, tmp)
        if db is None:
            missing.append(f"no {DB_NAME} under the output: its MLflow store was kept elsewhere (older neon-ray: the driver's "
                           "~/.cache/neon-ray)")
            yield None
            return
        yield MlflowClient(tracking_uri=f"sqlite:///{db}")


def copy_store(output: str, folder: str) -> str | None:
    """`<output>/mlflow.db` copied into `folder` (local or remote output alike), or None if there is none."""
    src = storage.join(output, DB_NAME)
    if not storage.exists(src):
        return None
    dest = os.path.join(folder, DB_NAME)
    with storage.local_copy(src, "MLflow store") as local:
        shutil.copyfile(local, dest)
    return dest


def _add_mlflow(client, state: dict, record: dict, missing: list[str]) -> None:
    parent = state.get("parent_run_id")
    try:
        client.get_run(parent)
    except Exception:  # noqa: BLE001 - a store without that run
        missing.append(f"the MLflow store has no run {parent}")
        return
    exp = state.get("experiment_id")
    runs = client.search_runs([exp], "tags.stage = 'tune-trial'", max_results=5000) if exp else []
    by_key = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        key = run.data.tags.get("trial_key") or trial_key_of_params(run.data.params)
        by_key[key] = run
    for trial in record["trials"]:
        run = by_key.get(trial["key"])
        if run is None:
            continue
        trial["run_id"] = run.info.run_id
        tags = run.data.tags
        if "trial.status" in tags:
            trial["status"] = tags["trial.status"]
        if "trial.rung" in tags:
            trial["rung"] = int(float(tags["trial.rung"]))
        if "trial.winner" in tags:
            trial["winner"] = tags["trial.winner"] == "true"
        if any(a.path == TRIAL_GRID for a in client.list_artifacts(run.info.run_id)):
            trial["grid"] = f"{run.info.artifact_uri.rstrip('/')}/{TRIAL_GRID}"
    if record["trials"] and not any(t["run_id"] for t in record["trials"]):
        missing.append("no trial runs in the MLflow record")
    _add_registry(client, record, missing)


def _add_registry(client, record: dict, missing: list[str]) -> None:
    model = record["registered_model"]
    if model is None:
        return
    try:
        version = client.get_model_version(model["name"], model["version"])
    except Exception:  # noqa: BLE001 - an older store, or registered elsewhere
        missing.append(f"the registered model {model['name']} version {model['version']} is not in this MLflow store")
        return
    model["alias"] = model["alias"] or next(iter(version.aliases or []), None)
    model["trial_run_id"] = model["trial_run_id"] or version.tags.get("trial_run_id")
    if not model["uri"] and getattr(version, "model_id", None):
        model["uri"] = client.get_logged_model(version.model_id).artifact_location
    if not model["uri"]:
        model["uri"] = version.source
    if model["alias"] is None:
        missing.append("the registered model has no alias (an older neon-ray did not set `champion`)")
    if model["trial_run_id"] is None:
        missing.append("the registered model is not linked to its trial's run (older neon-ray)")


# ----------------------------------------------------------------------------------------------
# Text


def render(record: dict) -> str:
    """The record as text: stages, the trials table, the headline, the registered model, what is missing."""
    lines = [f"output {record['output']}  (MLflow parent run {record['parent_run_id'] or '-'})", "", "stages:"]
    lines += [f"  {name:<9} {s['seconds']:>9.1f} s" for name, s in record["stages"].items()]
    if record["trials"]:
        lines += ["", *_trial_table(record["trials"], (record.get("search") or {}).get("rungs") or [])]
    head = record["headline"]
    if head:
        sampler = ", ".join(f"{k}={v}" for k, v in (head.get("best_sampler") or {}).items())
        base = f"base FID {head['fid_base']:.3f}  →  " if head.get("fid_base") is not None else ""
        setting = f" {sampler}" if sampler else ""
        lines += ["", f"headline: {base}Neon FID {head['fid_neon']:.3f} at w={head['best_w']:.3g}{setting} (n={head.get('n_eval')})"]
    model = record["registered_model"]
    if model:
        alias = f" @{model['alias']}" if model.get("alias") else ""
        lines += [f"registered model: {model['name']} version {model['version']}{alias}",
                  f"  load: mlflow.pyfunc.load_model({model['uri']!r})" if model.get("uri") else "  (no model URI recorded)"]
    if record["missing"]:
        lines += ["", "missing:", *[f"  - {m}" for m in record["missing"]]]
    return "\n".join(lines)


def _trial_table(trials: list[dict], rungs: list[int]) -> list[str]:
    ns = sorted({int(n) for n in rungs} | {n for t in trials for n in t["fid"]})
    params = [k for k in trials[0]["params"]]
    header = [*params, *[f"FID@{n}" for n in ns], "status", "run"]
    rows = []
    for t in trials:
        mark = "completed" if t["status"] == "completed" else f"stopped@{t['rung']}"
        rows.append([*[_fmt(t["params"].get(k)) for k in params], *[_fmt(t["fid"].get(n)) for n in ns],
                     mark + ("  ◀ winner" if t["winner"] else ""), (t["run_id"] or "-")[:8]])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return ["trials:", "  " + fmt.format(*header), *["  " + fmt.format(*r) for r in rows]]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------------------
# The MLflow UI on a copy of the record


def ui(output: str, port: int) -> int:
    """`mlflow ui` on loopback over a local copy of the output's store, until Ctrl-C; returns its exit code."""
    state = _read_json(storage.join(output, STATE_FILE)) or {}
    if state.get("store") == "external":
        raise NeonError(f"review --ui: the record of {storage.redact_uri(output)} is on a tracking server "
                        f"({state.get('tracking_uri')}); open that server's UI")
    with tempfile.TemporaryDirectory(prefix="neon-review-ui-") as tmp:
        db = copy_store(output, tmp)
        if db is None:
            raise NeonError(f"review --ui: no {DB_NAME} under {storage.redact_uri(output)}")
        mlflow = Path(sys.executable).with_name("mlflow")
        # One worker: a supervisor of several kills a worker that is slow to answer its health check (a busy machine).
        cmd = [str(mlflow) if mlflow.exists() else "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{db}"]
        print(f"MLflow UI on http://127.0.0.1:{port} (a copy of {redact(storage.redact_uri(output))}'s record; Ctrl-C stops it)",
              flush=True)
        proc = subprocess.Popen(cmd, cwd=tmp)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(15)
            return 0
