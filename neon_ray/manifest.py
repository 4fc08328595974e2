"""Stage manifests: `<output>/<stage>/manifest.json`, written last; a stage is done iff its manifest exists
and records the current config hash. Rerunning a finished stage with the same config is a no-op."""

from __future__ import annotations

import datetime as _dt
import logging
import time
from typing import Any

from . import __version__, storage

log = logging.getLogger("neon_ray")

MANIFEST = "manifest.json"


def stage_uri(output: str, stage: str) -> str:
    return storage.join(output, stage)


def read_manifest(stage_dir: str) -> dict[str, Any] | None:
    uri = storage.join(stage_dir, MANIFEST)
    if not storage.exists(uri):
        return None
    try:
        return storage.read_json(uri)
    except (ValueError, OSError):
        return None  # a torn or foreign file: treat as not done


def current_manifest(stage_dir: str, config_hash: str) -> dict[str, Any] | None:
    man = read_manifest(stage_dir)
    return man if man and man.get("config_hash") == config_hash else None


def invalidate(stage_dir: str) -> None:
    """Forget a stage's completion before redoing it, so a crash mid-way never leaves it marked done."""
    uri = storage.join(stage_dir, MANIFEST)
    if storage.exists(uri):
        storage.remove(uri)


class StageRecord:
    """Collects what a stage reports; `finish` writes the manifest (last)."""

    def __init__(self, stage: str, stage_dir: str, config_hash: str):
        self.stage, self.dir, self.config_hash = stage, stage_dir, config_hash
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.params: dict[str, Any] = {}
        self.started = time.time()

    def finish(self) -> dict[str, Any]:
        manifest = {
            "stage": self.stage,
            "config_hash": self.config_hash,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "metrics": self.metrics,
            "params": self.params,
            "wall_seconds": round(time.time() - self.started, 3),
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "neon_ray_version": __version__,
        }
        storage.write_json_atomic(storage.join(self.dir, MANIFEST), manifest)
        return manifest


def up_to_date(name: str, output: str, config_hash: str, force: bool = False) -> dict[str, Any] | None:
    """The stage's manifest when it already ran with this config (and `force` is off), else None."""
    if force:
        return None
    done = current_manifest(stage_uri(output, name), config_hash)
    if done is not None:
        log.info("%s: up to date (config %s), skipping", name, config_hash)
    return done


def start(name: str, output: str, config_hash: str) -> StageRecord:
    """Un-mark the stage as complete, create its folder, and start recording."""
    sdir = stage_uri(output, name)
    invalidate(sdir)
    storage.makedirs(sdir)
    return StageRecord(name, sdir, config_hash)
