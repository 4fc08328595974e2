"""The one place that talks to MLflow.

One parent run per output: its id is kept in `<output>/mlflow.json`, so every command on that output
(`run`, a rerun, a single stage) resumes the same parent. Each stage that actually runs gets a child
run, opened when the stage starts and closed with its manifest's params and metrics; a skipped stage
logs nothing. Tune trials are children of the tune stage's run, logged as each trial reports (by a
Ray Tune callback on the driver, see `tuning.callbacks`). The best Neon model is logged as an MLflow
pyfunc (weights as a safetensors artifact, code from `neon_ray.mlflow_model`, nothing pickled) and
registered in the Model Registry with its w, sampler settings and FID.

Default tracking URI: `mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else a sqlite database under
the output root (artifacts beside it in `mlartifacts/`), or in the user cache when the output is
remote. On a cluster set a tracking server that the driver and reviewers reach. A server that does
not answer stops the command before any work (`check_tracking`). Params and tags are redacted: no
credentials leave the process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from . import storage
from .config import RunConfig, to_yaml
from .errors import NeonError
from .manifest import Manifest

log = logging.getLogger("neon_ray")
STATE_FILE = "mlflow.json"
DB_NAME = "mlflow.db"
_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|api[_-]?key|credential|auth)", re.I)
_URI_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def redact(value: Any, key: str = "") -> Any:
    """Drop secrets: values under secret-looking keys, and user:password@ parts of URIs."""
    if _SECRET_KEY.search(key):
        return "***"
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        return _URI_USERINFO.sub(lambda m: m.group("scheme") + "***@", value)
    return value


def default_tracking_uri(cfg: RunConfig) -> str:
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{_default_root(cfg) / DB_NAME}"


def _default_root(cfg: RunConfig) -> Path:
    """Where the default sqlite store and its artifacts live: the output root, or the user cache for remote outputs."""
    if storage.is_local(cfg.output):
        return Path(os.path.abspath(storage.to_local_path(cfg.output)))
    return Path.home() / ".cache" / "neon-ray"


def _is_output_store(cfg: RunConfig, uri: str) -> bool:
    return storage.is_local(cfg.output) and uri == f"sqlite:///{_default_root(cfg) / DB_NAME}"


def check_tracking(cfg: RunConfig) -> None:
    """Stop before any work when a tracking server does not answer (the run's tracking would be lost)."""
    if not cfg.mlflow.enabled:
        return
    uri = default_tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return
    field = "mlflow.tracking_uri" if cfg.mlflow.tracking_uri else "MLFLOW_TRACKING_URI"
    shown = redact(uri)
    try:
        base = _URI_USERINFO.sub(lambda m: m.group("scheme"), uri).rstrip("/")
        with urllib.request.urlopen(f"{base}/health", timeout=10) as resp:
            resp.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NeonError(f"{field}: no MLflow server answers at {shown} ({reason}); start it, point {field} elsewhere, "
                        "or set mlflow.enabled=false to run untracked") from None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in _flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _params(d: dict) -> dict[str, str]:
    flat = _flatten(redact(d))
    return {k[:250]: (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:500] for k, v in flat.items()}


def registered_model_name(cfg: RunConfig) -> str:
    name = cfg.mlflow.registered_model or f"neon-{cfg.data.name}-{cfg.model.family}-{cfg.model.preset}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class MetricsSink:
    """Logs metrics to one MLflow run from another process (Ray Train's controller): picklable, it opens its own
    client there. A failure to log is reported once and never stops training."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id, self._client, self._failed = tracking_uri, run_id, None, False

    def __getstate__(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None, "_failed": False}

    def __call__(self, metrics: dict, step: int) -> None:
        if self._failed:
            return
        try:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            self._client = self._client or MlflowClient(tracking_uri=self.tracking_uri)
            now = int(time.time() * 1000)
            self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in numeric(metrics).items()])
        except Exception as exc:  # noqa: BLE001 - live metrics are a convenience; the stage logs its history at the end
            self._failed = True
            log.warning("MLflow: live metrics of run %s stopped (%s); the full curve is logged when the stage ends",
                        self.run_id, type(exc).__name__)


class Tracker:
    """The output's parent run and its children; every method is a no-op when `mlflow.enabled` is false."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.enabled = cfg.mlflow.enabled
        self.parent_id: str | None = None
        self.state: dict[str, Any] = {}
        self._system_metrics: dict[str, Any] = {}  # stage run id → MLflow's system-metrics monitor of that run
        if not self.enabled:
            return
        # MLflow prints "View run at <tracking URI>" links: the URI may carry credentials, and logs are no place for them.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        import mlflow
        from mlflow.tracking import MlflowClient

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.mlflow = mlflow
        self.uri = default_tracking_uri(cfg)
        self.state_uri = storage.join(cfg.output, STATE_FILE)
        self.state = storage.read_json(self.state_uri) if storage.exists(self.state_uri) else {}
        if _is_output_store(cfg, self.uri):
            os.makedirs(_default_root(cfg), exist_ok=True)
            if self.state.get("output") not in (None, cfg.output) and self.state.get("store") == "output-sqlite":
                _relocate_sqlite(_default_root(cfg) / DB_NAME, self.state["output"], cfg.output)
        elif self.uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(self.uri[len("sqlite:///"):]), exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment()

    # -- the parent run --------------------------------------------------------------------------
    def _experiment(self) -> str:
        name = self.cfg.mlflow.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifacts = None
        if self.uri.startswith("sqlite:///"):  # MLflow's default would be ./mlruns of whatever the working directory is
            artifacts = (_default_root(self.cfg) / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=artifacts)

    def open(self) -> None:
        """Resume this output's parent run (or create it) and record the resolved config."""
        if not self.enabled:
            return
        parent = self.state.get("parent_run_id")
        run = None
        if parent and self.state.get("experiment_id") == self.experiment_id:
            try:
                run = self.client.get_run(parent)
            except Exception:  # noqa: BLE001 - another store, or the run was deleted: start a new parent
                run = None
        if run is not None and run.info.lifecycle_stage == "active":
            self.parent_id = parent
            self.client.update_run(parent, status="RUNNING")
            log.info("MLflow: resuming run %s of this output", parent)
        else:
            name = self.cfg.mlflow.run_name or f"neon-ray {os.path.basename(self.cfg.output.rstrip('/'))}"
            self.parent_id = self.client.create_run(self.experiment_id, run_name=name, tags={"neon_ray.output": redact(self.cfg.output)}).info.run_id
            self.state = {"experiment_id": self.experiment_id}
        self._log_config()
        self.state.update(parent_run_id=self.parent_id, experiment_id=self.experiment_id, output=self.cfg.output,
                          tracking_uri=redact(self.uri), store="output-sqlite" if _is_output_store(self.cfg, self.uri) else "external")
        self._save_state()

    def _log_config(self) -> None:
        """Params that the parent run does not have yet (MLflow params are immutable), and the config as YAML."""
        from .config import fingerprint

        cfg_json = redact(self.cfg.model_dump(mode="json"))
        digest = fingerprint(cfg_json)
        if self.state.get("config_digest") == digest:
            return
        have = self.client.get_run(self.parent_id).data.params
        new = {k: v for k, v in _params(cfg_json).items() if k not in have}
        if new:
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in new.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.parent_id, params=items[i : i + 100])
        self.client.log_text(self.parent_id, to_yaml(type(self.cfg).model_validate(cfg_json)), "config.yaml")
        self.client.set_tag(self.parent_id, "config_digest", digest)
        self.state["config_digest"] = digest

    def _save_state(self) -> None:
        storage.write_json_atomic(self.state_uri, self.state)

    def close(self, ok: bool) -> None:
        if self.enabled and self.parent_id:
            self.client.set_terminated(self.parent_id, "FINISHED" if ok else "FAILED")

    # -- children ----------------------------------------------------------------------------------
    def start_child(self, name: str, parent: str | None = None, tags: dict[str, str] | None = None) -> str | None:
        if not self.enabled:
            return None
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": parent or self.parent_id, **(tags or {})})
        return run.info.run_id

    def log_metrics(self, run_id: str | None, metrics: dict, step: int = 0) -> None:
        if not self.enabled or run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in numeric(metrics).items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def log_params(self, run_id: str | None, params: dict) -> None:
        if not self.enabled or run_id is None or not params:
            return
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, v) for k, v in _params(params).items()])

    def end_child(self, run_id: str | None, ok: bool) -> None:
        if self.enabled and run_id is not None:
            if (monitor := self._system_metrics.pop(run_id, None)) is not None:
                monitor.finish()
            self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def find_child(self, parent: str | None, tags: dict[str, str], unfinished: bool = False) -> str | None:
        """The newest child run of `parent` carrying all of `tags` (only one that did not finish, if asked), or None."""
        if not self.enabled:
            return None
        conditions = [f"tags.`mlflow.parentRunId` = '{parent or self.parent_id}'"]
        conditions += [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        runs = self.client.search_runs([self.experiment_id], " and ".join(conditions), order_by=["attributes.start_time DESC"])
        for run in runs:
            if not unfinished or run.info.status != "FINISHED":
                return run.info.run_id
        return None

    def resume_child(self, name: str, parent: str | None, tags: dict[str, str], key: tuple[str, ...],
                     unfinished: bool = True) -> str | None:
        """The child run whose `key` tags match (reopened), else a new one: an interrupted stage or trial that is
        resumed keeps logging to the run it started, so a stopped and resubmitted job shows each once.
        `unfinished=False` reopens a matching run even if it had finished (a key that names one run for good)."""
        run = self.find_child(parent, {k: tags[k] for k in key}, unfinished=unfinished)
        if run is None:
            return self.start_child(name, parent, tags)
        self.client.update_run(run, status="RUNNING")
        return run

    def start_stage(self, stage: str, config_hash: str) -> str | None:
        run = self.resume_child(stage, None, {"stage": stage, "config_hash": config_hash}, key=("stage", "config_hash"))
        if run is not None:
            self._monitor_system(run)
        return run

    def _monitor_system(self, run_id: str) -> None:
        """MLflow's system metrics (CPU, memory, disk, network, GPUs) of the driver's node while a stage runs."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # start/stop lines per stage
            monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True, tracking_uri=self.uri)
            monitor.start()
        except Exception as exc:  # noqa: BLE001 - psutil missing, an unsupported platform: the stage runs without them
            log.debug("MLflow system metrics unavailable (%s)", exc)
            return
        self._system_metrics[run_id] = monitor

    def live_metrics(self, run_id: str | None) -> MetricsSink | None:
        """A sink for a stage's metrics as they arrive from Ray Train (None when tracking is off). A tracking URI with
        credentials in it is not handed to another process: then the curve is logged when the stage ends."""
        if not self.enabled or run_id is None or redact(self.uri) != self.uri:
            return None
        return MetricsSink(self.uri, run_id)

    def finish_stage(self, run_id: str | None, manifest: Manifest) -> None:
        """Params, metrics, loss curve and the manifest of a finished stage, then close its run."""
        if not self.enabled or run_id is None:
            return
        self.log_params(run_id, manifest.params | {f"input.{k}": v for k, v in manifest.inputs.items()})
        self.log_metrics(run_id, {k: v for k, v in manifest.metrics.items() if k != "trials"} | {"wall_seconds": manifest.wall_seconds})
        history = manifest.outputs.get("history")
        logged_live = bool(self.client.get_metric_history(run_id, "loss"))
        if history and not logged_live and storage.exists(uri := storage.resolve(self.cfg.output, history)):
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            rows = [Metric(name, float(row[name]), now, int(row["step"])) for row in storage.read_json(uri) for name in ("loss", "lr")]
            for i in range(0, len(rows), 500):
                self.client.log_batch(run_id, metrics=rows[i : i + 500])
        self.client.log_dict(run_id, redact(manifest.model_dump(mode="json")), "manifest.json")
        self.end_child(run_id, ok=True)

    # -- the run's results ------------------------------------------------------------------------
    def log_summary(self, summary: dict, images: dict[str, str]) -> None:
        """Headline metrics, summary.json and plots on the parent run, once per distinct summary."""
        if not self.enabled:
            return
        stable = {k: v for k, v in summary.items() if k != "stage_seconds"}  # a skip-only rerun changes nothing else
        digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]
        if self.state.get("summary_digest") == digest:
            return
        skip = ("trials", "stage_seconds", "stage_wall_seconds")
        self.log_metrics(self.parent_id, {k: v for k, v in summary.items() if k not in skip}
                         | {f"seconds.{k}": v for k, v in summary.get("stage_seconds", {}).items()})
        self.client.log_dict(self.parent_id, redact(summary), "summary.json")
        for path in images.values():
            self.client.log_artifact(self.parent_id, path, artifact_path="plots")
        self.state["summary_digest"] = digest
        self._save_state()

    def register_model(self, run_id: str | None, model_uri: str, spec, settings, metadata: dict[str, Any]) -> dict | None:
        """Log θ_neon as a pyfunc model under the tune stage's run and register it; returns name and version."""
        if not self.enabled or run_id is None:
            return None
        from mlflow.exceptions import MlflowException

        name = registered_model_name(self.cfg)
        with storage.local_copy(model_uri, "best model") as weights:
            with self.mlflow.start_run(run_id=run_id):
                info = _log_neon_model(weights, spec, settings, redact(metadata))
            self.client.update_run(run_id, status="RUNNING")  # leaving start_run ended the stage run; finish_stage ends it
        try:
            self.client.create_registered_model(name, description="Neon models (θ_base − w·(θ_ft − θ_base)) chosen by FID")
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        tags = {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v) for k, v in redact(metadata).items()}
        version = self.client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id).version
        log.info("MLflow: registered %s version %s (%s)", name, version, ", ".join(f"{k}={v}" for k, v in metadata.items() if k in ("w", "fid")))
        return {"name": name, "version": str(version)}

    def annotate_trials(self, tune_run: str | None, rows: list[dict], rungs: list[int], winner_key: str | None,
                        grids: dict[str, str]) -> None:
        """After a search: each trial run tagged with its status (`completed`: scored at the last rung, else
        `stopped`), the largest n it was scored at and whether it is the registered pick, with its sample grid; the
        trial table as an MLflow table artifact of the tune stage's run (`trials.json`)."""
        if not self.enabled or tune_run is None:
            return
        for row in rows:
            run = self.find_child(tune_run, {"stage": "tune-trial", "trial_key": row["key"]})
            if run is None:
                continue  # a trial scored by an earlier search of this output, before trial runs carried their key
            last = max(int(n) for n in row["fid_by_n"])
            self.client.set_tag(run, "trial.status", "completed" if last >= rungs[-1] else "stopped")
            self.client.set_tag(run, "trial.rung", str(last))
            self.client.set_tag(run, "trial.winner", str(row["key"] == winner_key).lower())
            if row["key"] in grids:
                self.client.log_artifact(run, grids[row["key"]])
        table = {"key": [r["key"] for r in rows], "w": [r["w"] for r in rows],
                 **{f"sampler.{k}": [r["sampler"].get(k) for r in rows] for k in sorted({k for r in rows for k in r["sampler"]})},
                 **{f"fid_n{n}": [r["fid_by_n"].get(str(n)) for r in rows] for n in rungs},
                 "rung": [max(int(n) for n in r["fid_by_n"]) for r in rows], "winner": [r["key"] == winner_key for r in rows]}
        self.client.log_table(tune_run, data=table, artifact_file="trials.json")

    def ui_hint(self) -> str:
        if not self.enabled:
            return "MLflow disabled"
        if self.uri.startswith(("http://", "https://")):
            return f"open {redact(self.uri)}"
        return f"mlflow ui --backend-store-uri {redact(self.uri)}"


def _log_neon_model(weights: str, spec, settings, metadata: dict):
    """Log the pyfunc under the active run (returns MLflow's ModelInfo)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from . import __version__
    from .data.codec import CODECS

    codec = metadata.get("codec", "image")
    signature = ModelSignature(inputs=Schema([ColSpec("long", "label"), ColSpec("long", "seed")]),
                               outputs=Schema([ColSpec("binary", CODECS[codec].column)]))
    with tempfile.TemporaryDirectory(prefix="neon-mlflow-") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as fh:
            json.dump({"family": spec.family, "preset": spec.preset, "image_shape": list(spec.image_shape),
                       "num_classes": spec.num_classes, "options": spec.options, "sampler": settings.model_dump(mode="json"),
                       "codec": codec}, fh)
        code = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlflow_model.py")
        # The explicit signature stands in for an input example; and a checkout run from PYTHONPATH (this repo's own
        # set-up) is not a pip-installed `neon-ray`, which MLflow would report as a requirement mismatch.
        requirements_log = logging.getLogger("mlflow.utils.requirements_utils")
        level = requirements_log.level
        requirements_log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
                return mlflow.pyfunc.log_model(
                    name="neon_model", python_model=code, artifacts={"weights": weights, "spec": spec_path}, signature=signature,
                    metadata=metadata, pip_requirements=[f"neon-ray=={__version__}", "torch", "safetensors", "pandas"],
                )
        finally:
            requirements_log.setLevel(level)


def _relocate_sqlite(db: Path, old_root: str, new_root: str) -> None:
    """A copied or moved output's own sqlite store still names the old root in its artifact locations;
    point them at the new root so that logging never writes into the original (MLflow has no API for it)."""
    if not db.exists():
        return
    old, new = Path(old_root).as_uri(), Path(new_root).as_uri()
    columns = {"experiments": ("artifact_location",), "runs": ("artifact_uri",), "logged_models": ("artifact_location",),
               "model_versions": ("source", "storage_location")}
    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, cols in columns.items():
            if table not in tables:
                continue
            have = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
            for col in cols:
                if col in have:
                    con.execute(f"UPDATE {table} SET {col} = ? || substr({col}, ?) WHERE substr({col}, 1, ?) = ?",
                                (new, len(old) + 1, len(old) + 1, old + "/"))
    log.info("MLflow: this output was moved or copied from %s; its store now points at %s", old_root, new_root)
