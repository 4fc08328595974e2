"""What each stage reads, declared as data next to the stage, and the one function that fingerprints it.

A stage's fingerprint covers exactly what it reads, so that a finished output is reused only when none
of it changed:
- `fields`: config field paths (`"seed"`, `"model.options"`, or a whole section such as `"finetune"`,
  which means its fields less the section's OPERATIONAL ones: retries, placement, logging, ...);
- `derived`: inputs computed from the config (`DERIVED`): the dataset's identity (name, options, path
  and the files under the path), the model's data spec, the scoring sampler, the exact extractor;
- `needs`: upstream artifacts (`"base"`, or another stage), whose own fingerprints are folded in.
File-valued fields (`FILE_FIELDS`) count with their content identity, not just their path.

`HASH_SCHEME` (in neon_ray.manifest) numbers this scheme; a manifest of an older one is redone once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from . import storage
from .config import RunConfig, Section, fingerprint

BASE = "base"
# Config fields that name files or folders: their content identity (names, sizes, mtimes or etags) counts too.
FILE_FIELDS = ("evaluate.reference", "evaluate.reference_source", "diagnose.real_source")


@dataclass(frozen=True)
class StageInputs:
    """What a stage reads: config field paths, derived inputs (keys of DERIVED) and upstream artifacts."""

    fields: tuple[str, ...] = ()
    derived: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    # Stages whose finished outputs this one takes over where they are exactly what it would compute (each reuse checks
    # that itself); not inputs: they never enter its hash, and it runs the same without them.
    reuses: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = [d for d in self.derived if d not in DERIVED]
        if unknown:
            raise ValueError(f"unknown derived input {unknown[0]!r}; known: {sorted(DERIVED)}")

    def __or__(self, other: "StageInputs") -> "StageInputs":
        def union(a, b):
            return a + tuple(x for x in b if x not in a)

        return StageInputs(union(self.fields, other.fields), union(self.derived, other.derived), union(self.needs, other.needs),
                           union(self.reuses, other.reuses))


# ----------------------------------------------------------------------------------------------
# Derived inputs: (the function, the config fields it is computed from)


def _dataset_identity(cfg: RunConfig) -> dict:
    from .runtime.run_model import dataset_of

    return dataset_of(cfg).identity()


def _data_spec(cfg: RunConfig) -> dict:
    """What a model built for this data needs of it (not its content): shape, classes, codec."""
    from .runtime.run_model import dataset_of

    ds = dataset_of(cfg)
    return {"name": cfg.data.name, "shape": list(ds.sample_shape), "classes": ds.num_classes, "kind": ds.kind}


def _extractor(cfg: RunConfig) -> str:
    from .scoring import extractor_fingerprint

    return extractor_fingerprint(cfg)


DERIVED: dict[str, tuple[Callable[[RunConfig], Any], tuple[str, ...]]] = {
    "dataset": (_dataset_identity, ("data.name", "data.path", "data.options")),
    "data_spec": (_data_spec, ("data.name",)),
    "scoring_sampler": (lambda cfg: cfg.scoring_sampler(), ("sampler", "evaluate.sampler")),
    "extractor": (_extractor, ("evaluate.extractor", "evaluate.extractor_weights")),
}


# ----------------------------------------------------------------------------------------------
# Field paths


def field_value(cfg: RunConfig, path: str) -> Any:
    """The value a fingerprint takes for config field `path` (a section: its fields less the operational ones)."""
    node: Any = cfg
    for part in path.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    if isinstance(node, Section):
        parts = node.hash_parts()
        for sub in (f.removeprefix(path + ".") for f in FILE_FIELDS if f.startswith(path + ".")):
            parts[sub] = _file_value(parts.get(sub))
        return parts
    if isinstance(node, BaseModel):
        return node.model_dump(mode="json")
    return _file_value(node) if path in FILE_FIELDS else node


def _file_value(uri: str | None) -> Any:
    return {"uri": storage.redact_uri(uri), "content": storage.content_identity(uri)} if uri else uri


def config_leaves(model: BaseModel, prefix: str = "") -> list[str]:
    """Every leaf field path of a config (sections are walked; the sampler's typed fields count as leaves)."""
    paths = []
    for name in type(model).model_fields:
        value, path = getattr(model, name), f"{prefix}{name}"
        if isinstance(value, BaseModel):
            paths += config_leaves(value, path + ".")
        else:
            paths.append(path)
    return paths


def is_operational(cfg: RunConfig, path: str) -> bool:
    """True when `path` decides how a stage runs (placement, retries, logging, where things go), never what it computes."""
    node: Any = cfg
    for part in path.split("."):
        if isinstance(node, Section) and part in type(node).OPERATIONAL:
            return True
        if not isinstance(node, BaseModel):
            return False
        node = getattr(node, part)
    return False


def fields_read(inputs: StageInputs) -> set[str]:
    """The config field paths a declaration reads, derived inputs expanded to the fields they come from."""
    return set(inputs.fields) | {f for d in inputs.derived for f in DERIVED[d][1]}


def reads(inputs: StageInputs, path: str) -> bool:
    """Whether a stage with this declaration reads config leaf `path` (a declared field covers its sub-fields)."""
    return any(path == f or path.startswith(f + ".") for f in fields_read(inputs))


# ----------------------------------------------------------------------------------------------
# The fingerprint


def fingerprint_inputs(cfg: RunConfig, name: str, inputs: StageInputs, upstream: dict[str, str], options: dict | None = None) -> str:
    """The fingerprint of stage (or sub-result) `name`: its declared fields, derived inputs and upstream hashes."""
    fields = {path: field_value(cfg, path) for path in inputs.fields}
    derived = {key: _value(DERIVED[key][0](cfg)) for key in inputs.derived}
    missing = [dep for dep in inputs.needs if dep not in upstream]
    if missing:
        raise ValueError(f"{name}: no upstream hash for {missing}")
    return fingerprint(name, fields, derived, {dep: upstream[dep] for dep in inputs.needs}, *([options] if options else []))


def _value(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
