"""The one place that talks to MLflow.

One parent run per output: its id is kept in `<output>/mlflow.json`, so every command on that output
(`run`, a rerun, a single stage) resumes the same parent. Each stage that actually runs gets a child
run, opened when the stage starts and closed with its manifest's params and metrics; a skipped stage
logs nothing. Tune trials are children of the tune stage's run, logged as each trial reports (by a
Ray Tune callback on the driver, see `tuning.callbacks`). The best Neon model is logged as an MLflow
pyfunc (weights as a safetensors artifact, the `neon_ray` code it needs logged with it, nothing
pickled), registered in the Model Registry with its w, sampler settings, FID and a link to the
winning trial's run, and given the alias `champion`.

The record lives with the output (`record_store`). Without `mlflow.tracking_uri` / $MLFLOW_TRACKING_URI:
a local output holds its sqlite store and artifacts (`mlflow.db`, `mlartifacts/`); a remote one
(s3://, gs://) holds its artifacts (MLflow writes them there itself) and a copy of the sqlite store,
uploaded at every stage end and on exit from a working copy under ~/.cache/neon-ray/records (which a
new machine fills from the output first). With a tracking server the record lives on that server;
one that does not answer stops the command before any work (`check_tracking`), and one that stops
answering mid-run costs one warning line: the run goes on and its record is completed at the next stage
end. One driver writes an output's record at a time (`Lease`). Params and tags are redacted: no
credentials leave the process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from . import storage
from .config import RunConfig, to_yaml
from .errors import NeonError
from .manifest import Manifest

log = logging.getLogger("neon_ray")
STATE_FILE = "mlflow.json"
DB_NAME = "mlflow.db"
ARTIFACTS = "mlartifacts"
LEASE_FILE = "mlflow.lease"
LEASE_SECONDS = 600.0  # a killed driver on another machine holds an output this long; a live one renews every third of it
CHAMPION = "champion"
TRIAL_GRID = "samples.png"  # the sample grid logged with each trial's run
_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|api[_-]?key|credential|auth)", re.I)


def redact(value: Any, key: str = "") -> Any:
    """Drop secrets: values under secret-looking keys, and user:password@ parts of URIs."""
    if _SECRET_KEY.search(key):
        return "***"
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        return storage.redact_uri(value)
    return value


def record_store(cfg: RunConfig) -> str:
    """Where the output's MLflow record lives: "output-sqlite" (a sqlite store under a local output),
    "synced-sqlite" (a remote output's `mlflow.db`, kept in a local working copy and uploaded), or "external"
    (the tracking server or store that `mlflow.tracking_uri` / $MLFLOW_TRACKING_URI names)."""
    if cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return "external"
    return "output-sqlite" if storage.is_local(cfg.output) else "synced-sqlite"


def default_tracking_uri(cfg: RunConfig) -> str:
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{_default_root(cfg) / DB_NAME}"


def _default_root(cfg: RunConfig) -> Path:
    """Where the default sqlite store lives: the output root, or the working copy of a remote output's store."""
    if storage.is_local(cfg.output):
        return Path(os.path.abspath(storage.to_local_path(cfg.output)))
    return working_copy_dir(cfg.output)


def working_copy_dir(output: str) -> Path:
    """The driver's working copy of a remote output's sqlite store (one folder per output URI)."""
    digest = hashlib.sha256(output.rstrip("/").encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "neon-ray" / "records" / digest


def _root_uri(output: str) -> str:
    """The output root as MLflow writes it in artifact locations."""
    if storage.is_local(output):
        return Path(os.path.abspath(storage.to_local_path(output))).as_uri()
    return output.rstrip("/")


def relative_to_output(output: str, uri: str) -> str:
    """An artifact URI relative to the output root when it lies there (a copied output then names its own copy)."""
    root = _root_uri(output)
    return uri[len(root) + 1:] if uri.startswith(root + "/") else uri


def artifact_root(output: str) -> str:
    return f"{_root_uri(output)}/{ARTIFACTS}"


def _is_output_store(cfg: RunConfig, uri: str) -> bool:
    return record_store(cfg) != "external" and uri == f"sqlite:///{_default_root(cfg) / DB_NAME}"


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
        base = storage.without_userinfo(uri).rstrip("/")
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


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _tolerant(method):
    """On a tracking server, an MLflow call that fails after `open` costs one warning: the run goes on and the
    record is completed at the next stage end (`_reconnect`). A local store's errors are bugs and are raised."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if not self.enabled or self.unreachable:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # any client error: connection refused, 5xx, timeouts
            if not _is_server(self.uri) or self.parent_id is None:
                raise
            self._lost(exc)
            return None

    return guarded


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
        self.unreachable = False
        self.lease: Lease | None = None
        self._unlogged: list[Manifest] = []  # stages that finished while the server did not answer
        if not self.enabled:
            return
        # MLflow prints "View run at <tracking URI>" links: the URI may carry credentials, and logs are no place for them.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        import mlflow

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.mlflow = mlflow
        self.uri = default_tracking_uri(cfg)
        self.store = record_store(cfg)
        if _is_server(self.uri):
            # MLflow retries a silent server for minutes per call; a few quick retries, then the run goes on without it.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            # urllib3 warns at each retry; `_lost` says it once, in one line.
            logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        self.state_uri = storage.join(cfg.output, STATE_FILE)
        self.state = storage.read_json(self.state_uri) if storage.exists(self.state_uri) else {}

    def _connect(self) -> None:
        """The store: the output's own (pulled first when remote, re-pointed when the output moved), or the configured one."""
        from mlflow.tracking import MlflowClient

        if _is_output_store(self.cfg, self.uri):
            os.makedirs(_default_root(self.cfg), exist_ok=True)
            if self.store == "synced-sqlite":
                _pull_store(self.cfg.output, _default_root(self.cfg) / DB_NAME)
            moved_from = self.state.get("output")
            if moved_from not in (None, self.cfg.output) and self.state.get("store") in ("output-sqlite", "synced-sqlite"):
                _relocate_sqlite(_default_root(self.cfg) / DB_NAME, moved_from, self.cfg.output)
        elif self.uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(self.uri[len("sqlite:///"):]), exist_ok=True)
        self.mlflow.set_tracking_uri(self.uri)
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
            artifacts = artifact_root(self.cfg.output)
        return self.client.create_experiment(name, artifact_location=artifacts)

    def open(self) -> None:
        """Take the output's lease, resume its parent run (or create it) and record the resolved config."""
        if not self.enabled:
            return
        self.lease = Lease(storage.join(self.cfg.output, LEASE_FILE))
        self.lease.acquire()
        try:
            self._connect()
            self._open_parent()
        except BaseException:
            self.lease.release()
            raise
        self.sync()

    def _open_parent(self) -> None:
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
                          tracking_uri=redact(self.uri) if self.store == "external" else None, store=self.store,
                          artifacts=ARTIFACTS if self.store != "external" else None)
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

    def sync(self) -> None:
        """Put the record where it belongs: a remote output's store is uploaded (the lease renewed with it)."""
        if not self.enabled or self.parent_id is None:
            return
        if self.store == "synced-sqlite":
            _push_store(_default_root(self.cfg) / DB_NAME, self.cfg.output)
        if self.lease is not None:
            self.lease.renew()

    def close(self, ok: bool) -> None:
        if not self.enabled or not self.parent_id:
            return
        try:
            self._reconnect()
            self._set_terminated(self.parent_id, "FINISHED" if ok else "FAILED")
            self.sync()
        finally:
            if self.lease is not None:
                self.lease.release()

    @_tolerant
    def _set_terminated(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)

    # -- a tracking server that stops answering ----------------------------------------------------
    def _lost(self, exc: BaseException) -> None:
        self.unreachable = True
        reason = storage.describe_storage_error(exc)[:200]
        log.warning("MLflow: the tracking server at %s stopped answering (%s); the run goes on, and its record is "
                    "completed at the next stage end that reaches it", redact(self.uri), reason)

    def _reconnect(self) -> bool:
        """At a stage end: is the server back? Then log the stages that finished meanwhile."""
        if not self.unreachable:
            return True
        base = storage.without_userinfo(self.uri).rstrip("/")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=10) as resp:
                resp.read()
        except (urllib.error.URLError, OSError, ValueError):
            return False
        self.unreachable = False
        log.info("MLflow: the tracking server answers again; completing the record")
        pending, self._unlogged = self._unlogged, []
        for manifest in pending:
            self.finish_stage(None, manifest)
        return not self.unreachable

    # -- children ----------------------------------------------------------------------------------
    @_tolerant
    def start_child(self, name: str, parent: str | None = None, tags: dict[str, str] | None = None) -> str | None:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": parent or self.parent_id, **(tags or {})})
        return run.info.run_id

    @_tolerant
    def log_metrics(self, run_id: str | None, metrics: dict, step: int = 0) -> None:
        if run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in numeric(metrics).items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    @_tolerant
    def log_params(self, run_id: str | None, params: dict) -> None:
        if run_id is None or not params:
            return
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, v) for k, v in _params(params).items()])

    @_tolerant
    def end_child(self, run_id: str | None, ok: bool) -> None:
        if run_id is not None:
            if (monitor := self._system_metrics.pop(run_id, None)) is not None:
                monitor.finish()
            self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    @_tolerant
    def find_child(self, parent: str | None, tags: dict[str, str], unfinished: bool = False) -> str | None:
        """The newest child run of `parent` carrying all of `tags` (only one that did not finish, if asked), or None."""
        conditions = [f"tags.`mlflow.parentRunId` = '{parent or self.parent_id}'"]
        conditions += [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        runs = self.client.search_runs([self.experiment_id], " and ".join(conditions), order_by=["attributes.start_time DESC"])
        for run in runs:
            if not unfinished or run.info.status != "FINISHED":
                return run.info.run_id
        return None

    @_tolerant
    def resume_child(self, name: str, parent: str | None, tags: dict[str, str], key: tuple[str, ...],
                     unfinished: bool = True) -> str | None:
        """The child run whose `key` tags match (reopened), else a new one: an interrupted stage or trial that is
        resumed keeps logging to the run it started, so a stopped and resubmitted job shows each once.
        `unfinished=False` reopens a matching run even if it had finished (a key that names one run for good)."""
        run = self.find_child(parent, {k: tags[k] for k in key}, unfinished=unfinished)
        if self.unreachable:
            return None
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

            # Its start/stop lines per stage, and its warnings when a server stops answering (the tracker says that once).
            logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
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
        """Params, metrics, loss curve and the manifest of a finished stage, then close its run and sync the record.
        A stage that finished while the server did not answer is logged once it answers again."""
        if not self.enabled:
            return
        if not self._reconnect():
            self._unlogged.append(manifest)
            return
        if run_id is None and _is_server(self.uri):  # started while the server did not answer
            run_id = self.start_stage(manifest.stage, manifest.config_hash)
        if run_id is not None:
            self._log_stage(run_id, manifest)
        if self.unreachable:
            self._unlogged.append(manifest)
        self.sync()

    @_tolerant
    def _log_stage(self, run_id: str, manifest: Manifest) -> None:
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
        if not self.enabled or not self._reconnect():
            return
        stable = {k: v for k, v in summary.items() if k != "stage_seconds"}  # a skip-only rerun changes nothing else
        digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]
        if self.state.get("summary_digest") == digest:
            return
        if self._log_summary(summary, images):
            self.state["summary_digest"] = digest
            self._save_state()
        self.sync()

    @_tolerant
    def _log_summary(self, summary: dict, images: dict[str, str]) -> bool:
        skip = ("trials", "stage_seconds", "stage_wall_seconds")
        self.log_metrics(self.parent_id, {k: v for k, v in summary.items() if k not in skip}
                         | {f"seconds.{k}": v for k, v in summary.get("stage_seconds", {}).items()})
        self.client.log_dict(self.parent_id, redact(summary), "summary.json")
        for path in images.values():
            self.client.log_artifact(self.parent_id, path, artifact_path="plots")
        return not self.unreachable

    @_tolerant
    def register_model(self, run_id: str | None, model_uri: str, spec, settings, metadata: dict[str, Any],
                       trial_key: str | None = None) -> dict | None:
        """Log θ_neon as a pyfunc model under the tune stage's run, register it linked to the winning trial's run
        (`trial_key`), and give it the alias `champion`. Returns name, version, alias, the model's artifact URI
        (loadable by `mlflow.pyfunc.load_model` wherever the output can be read) and the trial's run id."""
        if run_id is None:
            return None
        from mlflow.exceptions import MlflowException

        name = registered_model_name(self.cfg)
        trial_run = self._trial_run(run_id, trial_key, metadata) if trial_key else None
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
        tags |= {k: v for k, v in (("trial_key", trial_key), ("trial_run_id", trial_run)) if v}
        version = self.client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id).version
        self.client.set_registered_model_alias(name, CHAMPION, version)
        if trial_run:
            self.client.set_tag(trial_run, "registered_model", f"{name}/{version}")
        location = self.client.get_logged_model(info.model_id).artifact_location
        log.info("MLflow: registered %s version %s as @%s (%s)", name, version, CHAMPION,
                 ", ".join(f"{k}={v}" for k, v in metadata.items() if k in ("w", "fid")))
        return {"name": name, "version": str(version), "alias": CHAMPION, "uri": location, "trial_run_id": trial_run,
                "path": relative_to_output(self.cfg.output, location)}

    def _trial_run(self, stage_run: str, trial_key: str, metadata: dict) -> str | None:
        """The winning trial's run: by its `trial_key` tag, else (runs of older versions) by its w and sampler params."""
        found = self.find_child(stage_run, {"stage": "tune-trial", "trial_key": trial_key})
        if found:
            return found
        runs = self.client.search_runs([self.experiment_id], f"tags.`mlflow.parentRunId` = '{stage_run}' and tags.stage = 'tune-trial'")
        for run in runs:
            if trial_key_of_params(run.data.params) == trial_key:
                return run.info.run_id
        return None

    @_tolerant
    def annotate_trials(self, tune_run: str | None, rows: list[dict], rungs: list[int], winner_key: str | None,
                        grids: dict[str, str]) -> None:
        """After a search: each trial run tagged with its status (`completed`: scored at the last rung, else
        `stopped`), the largest n it was scored at and whether it is the registered pick, with its sample grid; the
        trial table as an MLflow table artifact of the tune stage's run (`trials.json`). A trial whose run or rung
        scores were not logged while it ran (the server did not answer, or an older neon-ray scored it) gets them
        here, from the search's results: the record is whole at the stage's end."""
        if tune_run is None:
            return
        for row in rows:
            run = self._whole_trial_run(tune_run, row)
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

    def _whole_trial_run(self, tune_run: str, row: dict) -> str:
        """The trial's run (made if missing), holding its score at every rung it reached."""
        run = self.find_child(tune_run, {"stage": "tune-trial", "trial_key": row["key"]}, unfinished=False)
        if run is None:
            run = self.start_child(f"trial {row['key']}", tune_run, {"stage": "tune-trial", "trial_key": row["key"]})
            self.log_params(run, {"w": float(row["w"]), **{f"sampler.{k}": v for k, v in row["sampler"].items()}})
            self.end_child(run, ok=True)
        logged = set(self.client.get_run(run).data.metrics)
        last = max(int(n) for n in row["fid_by_n"])
        for n, fid in row["fid_by_n"].items():
            scores = {f"fid_n{n}": fid, f"fid_floor_n{n}": row.get("floor_by_n", {}).get(n)}
            if int(n) == last:
                scores |= {f"{k}_n{n}": row.get(k) for k in ("precision", "recall", "class_consistency")}
            missing = {k: v for k, v in scores.items() if k not in logged and v is not None}
            if missing:
                self.log_metrics(run, missing | ({"n": int(n)} if "n" not in logged else {}), step=int(n))
        return run

    def ui_hint(self) -> str:
        if not self.enabled:
            return "MLflow disabled"
        if _is_server(self.uri):
            return f"open {redact(self.uri)}"
        if self.store == "synced-sqlite":
            return f"neon-ray review {redact(self.cfg.output)} --ui"
        return f"mlflow ui --backend-store-uri {redact(self.uri)}"


def trial_key_of_params(params: dict[str, str]) -> str | None:
    """A trial run's key (its folder name under tune/trials, `tuning.spaces.trial_key`) rebuilt from its logged
    params `w` and `sampler.*` (a trial run of an older version has no `trial_key` tag)."""
    if "w" not in params:
        return None
    parts = [f"w={float(params['w']):.6g}"]
    for k in sorted(p for p in params if p.startswith("sampler.")):
        value = params[k]
        try:
            value = f"{float(value):.6g}"
        except ValueError:
            pass
        parts.append(f"{k.removeprefix('sampler.')}={value}")
    return ",".join(parts)


# ----------------------------------------------------------------------------------------------
# A remote output's sqlite store: a working copy on the driver, the record itself on the output


def _stamp_file(db: Path) -> Path:
    return db.with_name(db.name + ".synced.json")


def _remote_stamp(output: str) -> str | None:
    fs, path = storage.filesystem(storage.join(output, DB_NAME))
    try:
        return storage.file_stamp(fs.info(path))
    except FileNotFoundError:
        return None


def _pull_store(output: str, db: Path) -> None:
    """Fill the working copy from `<output>/mlflow.db`, unless the working copy is what this machine last uploaded
    there (then it is as new or newer: a driver killed between two uploads)."""
    stamp = _remote_stamp(output)
    synced = _stamp_file(db)
    if stamp is None:  # a new output (or one whose record was deleted): a working copy left from before is not its record
        for stale in (db, synced):
            stale.unlink(missing_ok=True)
        return
    if db.exists() and synced.exists() and json.loads(synced.read_text()).get("stamp") == stamp:
        return
    tmp = db.with_name(f"{db.name}.tmp-{uuid.uuid4().hex}")
    fs, path = storage.filesystem(storage.join(output, DB_NAME))
    fs.get_file(path, str(tmp))
    os.replace(tmp, db)
    synced.write_text(json.dumps({"stamp": stamp, "output": redact(output)}))
    log.info("MLflow: the record of %s was read from the output", storage.redact_uri(output))


def _push_store(db: Path, output: str) -> None:
    """Upload a consistent snapshot of the working copy (sqlite's backup API, never a file mid-write) as `<output>/mlflow.db`."""
    if not db.exists():
        return
    with tempfile.TemporaryDirectory(prefix="neon-mlflow-sync-") as tmp:
        snapshot = os.path.join(tmp, DB_NAME)
        src, dst = sqlite3.connect(db), sqlite3.connect(snapshot)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        storage.upload_file_atomic(snapshot, storage.join(output, DB_NAME))
    _stamp_file(db).write_text(json.dumps({"stamp": _remote_stamp(output), "output": redact(output)}))


# ----------------------------------------------------------------------------------------------
# One driver per output


_OWNER = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex[:12]}


class Lease:
    """`<output>/mlflow.lease`: the driver that writes the output's record, until when. Another driver is refused
    while the lease is live; it expires LEASE_SECONDS after the last renewal (a thread renews it every third of
    that), and a lease whose process is gone from this very machine is taken over at once (a killed driver's
    rerun). An object store has no atomic create-if-absent: two drivers starting within the same second may both
    pass; each reads the lease back after writing it, which narrows that to a race between the read-backs."""

    def __init__(self, uri: str):
        self.uri = uri
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        held = self._read()
        if held and not self._mine(held) and not _expired(held):
            raise NeonError(self._refusal(held))
        self.renew()
        time.sleep(0.2)
        held = self._read()
        if held and not self._mine(held):
            raise NeonError(self._refusal(held))
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._keep, daemon=True, name="neon-ray-lease")
            self._thread.start()

    def renew(self) -> None:
        storage.write_json_atomic(self.uri, {**_OWNER, "expires": time.time() + LEASE_SECONDS})

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        try:
            if self._mine(self._read() or {}):
                storage.remove(self.uri)
        except Exception as exc:  # noqa: BLE001 - on the way out; the lease expires anyway
            log.debug("lease release failed: %s", exc)

    def _keep(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 3):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - retried a third of the lease later
                log.debug("lease renewal failed: %s", exc)

    def _read(self) -> dict | None:
        try:
            held = storage.read_json(self.uri)
        except (FileNotFoundError, ValueError):
            return None
        return held if isinstance(held, dict) else None

    @staticmethod
    def _mine(held: dict) -> bool:
        return held.get("id") == _OWNER["id"]

    def _refusal(self, held: dict) -> str:
        until = time.strftime("%H:%M:%S UTC", time.gmtime(float(held.get("expires", 0))))
        return (f"output: another neon-ray driver (host {held.get('host')}, pid {held.get('pid')}) is writing "
                f"{storage.redact_uri(self.uri.rsplit('/', 1)[0])}; wait for it to end, or rerun after its lease "
                f"({storage.redact_uri(self.uri)}) expires at {until}")


def _expired(held: dict) -> bool:
    if float(held.get("expires", 0)) < time.time():
        return True
    return held.get("host") == _OWNER["host"] and not _process_alive(int(held.get("pid", -1)))


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet is a zombie: gone for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _log_neon_model(weights: str, spec, settings, metadata: dict):
    """Log the pyfunc under the active run (returns MLflow's ModelInfo): portable, so it loads in any process
    with the requirements installed, with or without neon-ray (its code travels with the model)."""
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from .data.codec import CODECS

    codec = metadata.get("codec", "image")
    signature = ModelSignature(inputs=Schema([ColSpec("long", "label"), ColSpec("long", "seed")]),
                               outputs=Schema([ColSpec("binary", CODECS[codec].column)]))
    example = pd.DataFrame({"label": [0], "seed": [0]})  # one sample: MLflow predicts it once to check the model serves
    with tempfile.TemporaryDirectory(prefix="neon-mlflow-") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as fh:
            json.dump({"family": spec.family, "preset": spec.preset, "image_shape": list(spec.image_shape),
                       "num_classes": spec.num_classes, "options": spec.options, "sampler": settings.model_dump(mode="json"),
                       "codec": codec}, fh)
        code = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlflow_model.py")
        package = _package_copy(tmp)
        # The checkout is not a pip-installed `neon-ray`: MLflow would report that as a requirement mismatch.
        requirements_log = logging.getLogger("mlflow.utils.requirements_utils")
        level, path = requirements_log.level, list(sys.path)
        requirements_log.setLevel(logging.ERROR)
        try:
            return mlflow.pyfunc.log_model(
                name="neon_model", python_model=code, artifacts={"weights": weights, "spec": spec_path}, signature=signature,
                input_example=example, metadata=metadata, code_paths=[package], pip_requirements=model_requirements(),
            )
        finally:
            requirements_log.setLevel(level)
            sys.path[:] = path  # checking the input example loaded the model, which put its code folder first


def _package_copy(tmp: str) -> str:
    """The `neon_ray` package as the model's code (sources only): `import neon_ray` then works without a checkout."""
    package = os.path.dirname(os.path.abspath(__file__))
    dest = os.path.join(tmp, "code", "neon_ray")
    shutil.copytree(package, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


# What `neon_ray.models`, `neon_ray.data.codec` and `neon_ray.runtime.run_model` import, besides MLflow itself.
MODEL_REQUIREMENTS = ("torch", "safetensors", "numpy", "pandas", "pydantic", "pillow", "fsspec", "PyYAML")


def model_requirements() -> list[str]:
    """The model's pip requirements, pinned to this environment's versions as PyPI spells them (no `+cpu` tags)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("mlflow", *MODEL_REQUIREMENTS):
        try:
            out.append(f"{name}=={version(name).split('+', 1)[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def _relocate_sqlite(db: Path, old_root: str, new_root: str) -> None:
    """A copied or moved output's own sqlite store still names the old root in its artifact locations;
    point them at the new root so that logging never writes into the original (MLflow has no API for it)."""
    if not db.exists():
        return
    old, new = _root_uri(old_root), _root_uri(new_root)
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
    log.info("MLflow: this output was moved or copied from %s; its store now points at %s",
             storage.redact_uri(old_root), storage.redact_uri(new_root))
