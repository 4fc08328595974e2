"""The one place that talks to MLflow: a parent run per `neon-ray run`, a child run per stage and per trial.

Default tracking URI: $MLFLOW_TRACKING_URI, else a sqlite database under the output root (or the user
cache when the output is remote). Params are redacted: no credentials leave the process.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from . import storage
from .config import RunConfig, to_yaml

log = logging.getLogger("neon_ray")
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
    root = storage.to_local_path(cfg.output) if storage.is_local(cfg.output) else str(Path.home() / ".cache" / "neon-ray")
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{os.path.abspath(os.path.join(root, 'mlflow.db'))}"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in _flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """No-op when `mlflow.enabled` is false."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.enabled = cfg.mlflow.enabled
        self.parent_id: str | None = None
        if not self.enabled:
            return
        import mlflow

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.mlflow = mlflow
        self.uri = default_tracking_uri(cfg)
        mlflow.set_tracking_uri(self.uri)
        name = cfg.mlflow.experiment
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            artifacts = None
            if self.uri.startswith("sqlite:///") and storage.is_local(cfg.output):
                artifacts = Path(os.path.abspath(storage.to_local_path(cfg.output)), "mlartifacts").as_uri()
            self.experiment_id = mlflow.create_experiment(name, artifact_location=artifacts)
        else:
            self.experiment_id = exp.experiment_id

    def start_parent(self, run_name: str | None = None) -> None:
        if not self.enabled:
            return
        run = self.mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name or self.cfg.mlflow.run_name or "neon-ray run")
        self.parent_id = run.info.run_id
        cfg_json = redact(self.cfg.model_dump(mode="json"))
        params = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in _flatten(cfg_json).items()}
        self.mlflow.log_params({k[:250]: str(v)[:500] for k, v in params.items()})
        self.mlflow.log_text(to_yaml(type(self.cfg).model_validate(cfg_json)), "config.yaml")

    def log_stage(self, manifest: dict, skipped: bool) -> None:
        if not self.enabled:
            return
        with self.mlflow.start_run(experiment_id=self.experiment_id, run_name=manifest["stage"], nested=True):
            self.mlflow.set_tags({"stage": manifest["stage"], "skipped": str(skipped), "config_hash": manifest["config_hash"]})
            params = redact(_flatten(manifest.get("params", {})) | {f"input.{k}": v for k, v in _flatten(manifest.get("inputs", {})).items()})
            if params:
                self.mlflow.log_params({k[:250]: str(v)[:500] for k, v in params.items()})
            self.mlflow.log_metrics(_numeric({k: v for k, v in manifest.get("metrics", {}).items() if k != "trials"}) | {"wall_seconds": manifest["wall_seconds"]})
            self._log_history(manifest)
            self.mlflow.log_dict(redact(manifest), "manifest.json")
            for trial in manifest.get("metrics", {}).get("trials", []):
                with self.mlflow.start_run(experiment_id=self.experiment_id, run_name=f"trial w={trial['w']:.4g}", nested=True):
                    self.mlflow.set_tags({"stage": "tune-trial"})
                    self.mlflow.log_param("w", trial["w"])
                    self.mlflow.log_metrics(_numeric(trial))

    def _log_history(self, manifest: dict) -> None:
        uri = manifest.get("outputs", {}).get("history")
        if not uri or not storage.exists(uri):
            return
        for row in storage.read_json(uri):
            self.mlflow.log_metrics({"loss": row["loss"], "lr": row["lr"]}, step=int(row["step"]))

    def finish(self, summary: dict, images: dict[str, str]) -> None:
        if not self.enabled:
            return
        self.mlflow.log_metrics(_numeric({k: v for k, v in summary.items() if k not in ("trials", "stage_seconds")})
                                | {f"seconds.{k}": v for k, v in summary.get("stage_seconds", {}).items()})
        self.mlflow.log_dict(redact(summary), "summary.json")
        for name, path in images.items():
            self.mlflow.log_artifact(path, artifact_path="plots")
        self.mlflow.end_run()

    def fail(self) -> None:
        if self.enabled and self.mlflow.active_run() is not None:
            self.mlflow.end_run(status="FAILED")

    def ui_hint(self) -> str:
        if not self.enabled:
            return "MLflow disabled"
        return f"mlflow ui --backend-store-uri {self.uri}"
