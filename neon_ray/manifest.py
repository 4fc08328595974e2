"""Stage manifests: `<output>/<stage>/manifest.json`, written last; a stage is done iff its manifest exists
and records the current config hash. Rerunning a finished stage with the same config is a no-op.

A manifest names the files a stage wrote by their paths relative to the output root (`outputs`), so a
moved or copied output directory is still complete and consistent; `Manifest.uri` resolves them.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from . import __version__, storage

log = logging.getLogger("neon_ray")

MANIFEST = "manifest.json"
# The scheme of `config_hash` (neon_ray.inputs). 1: hand-picked config parts per stage (missed data.options,
# data.path and the reference's source); 2: every stage's declared inputs. Manifests without the field are 1.
HASH_SCHEME = 2


class Manifest(BaseModel):
    """What a finished stage did: its config hash, inputs, outputs (relative to the output root), metrics."""

    model_config = ConfigDict(extra="ignore")

    stage: str
    config_hash: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    wall_seconds: float = 0.0
    finished_at: str = ""
    neon_ray_version: str = __version__
    hash_scheme: int = 1

    @property
    def outdated_scheme(self) -> bool:
        return self.hash_scheme < HASH_SCHEME

    def uri(self, root: str, key: str) -> str:
        """The URI of output `key` under the output root `root` (wherever that root now is)."""
        return storage.resolve(root, self.outputs[key])


def stage_uri(output: str, stage: str) -> str:
    return storage.join(output, stage)


def read_manifest(output: str, stage: str) -> Manifest | None:
    uri = storage.join(stage_uri(output, stage), MANIFEST)
    if not storage.exists(uri):
        return None
    try:
        return Manifest.model_validate(storage.read_json(uri))
    except (ValueError, OSError):
        return None  # a torn or foreign file: treat as not done


class StageRecord:
    """Collects what a running stage reports; `finish` writes the manifest (last)."""

    def __init__(self, stage: str, output: str, config_hash: str):
        self.stage, self.output, self.config_hash = stage, output, config_hash
        self.dir = stage_uri(output, stage)
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, str] = {}
        self.metrics: dict[str, Any] = {}
        self.params: dict[str, Any] = {}
        self.started = time.time()
        # Forget an earlier completion before redoing the stage, so a crash mid-way never leaves it marked done.
        storage.remove(storage.join(self.dir, MANIFEST))
        storage.makedirs(self.dir)

    def finish(self) -> Manifest:
        manifest = Manifest(
            stage=self.stage, config_hash=self.config_hash,
            inputs={k: storage.relative(self.output, v) if isinstance(v, str) else v for k, v in self.inputs.items()},
            outputs={k: storage.relative(self.output, v) for k, v in self.outputs.items()},
            metrics=self.metrics, params=self.params, wall_seconds=round(time.time() - self.started, 3),
            finished_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), hash_scheme=HASH_SCHEME,
        )
        storage.write_json_atomic(storage.join(self.dir, MANIFEST), manifest.model_dump(mode="json"))
        return manifest
