"""What a stage receives besides its config section: `StageContext` (built by neon_ray.pipeline).

A stage never looks up another stage: the pipeline hands it the URIs of its inputs (`input_uri`),
the hashes they carry (`upstream_hashes`), and its own config hash; the stage records what it did
through `start()` and returns the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import storage
from .config import RunConfig
from .manifest import Manifest, StageRecord


@dataclass
class StageContext:
    cfg: RunConfig
    name: str
    config_hash: str
    upstream_hashes: dict[str, str]  # dependency name ("base", "generate", ...) → its hash
    upstream: dict[str, Manifest] = field(default_factory=dict)  # finished upstream stages
    reusable: dict[str, Manifest] = field(default_factory=dict)  # finished stages it may take outputs over from (INPUTS.reuses)
    files: dict[str, str] = field(default_factory=dict)  # dependency name → the file that stands for it (θ_base, a given checkpoint)
    tracker: Any = None  # neon_ray.tracking.Tracker of the output's MLflow run
    run_id: str | None = None  # this stage's MLflow child run
    options: dict[str, Any] = field(default_factory=dict)  # command-line extras (merge --out)
    force: bool = False  # `--force`: redo from scratch (no resume from earlier checkpoints or parts)

    @property
    def output(self) -> str:
        return self.cfg.output

    @property
    def stage_dir(self) -> str:
        return storage.join(self.output, self.name)

    def input_uri(self, dependency: str, key: str = "model") -> str:
        """The file an upstream dependency provides: a given checkpoint, or output `key` of that stage's manifest."""
        if dependency in self.files:
            return self.files[dependency]
        return self.upstream[dependency].uri(self.output, key)

    def start(self) -> StageRecord:
        """Un-mark the stage as complete and start recording its manifest."""
        return StageRecord(self.name, self.output, self.config_hash)
