"""Family registry: built-ins, `module:attr` plugins and the `neon_ray.models` entry-point group."""

from __future__ import annotations

from importlib.metadata import entry_points

from ..errors import ConfigError
from ..plugins import load_plugin
from .base import ModelFamily

_FAMILIES: dict[str, type[ModelFamily]] = {}


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make a family available by its `name`."""
    _FAMILIES[cls.name] = cls
    return cls


def _load_builtins() -> None:
    # Always import (cached by Python): a guard such as `if not _FAMILIES` would let one family module
    # imported directly hide the others.
    from . import autoregressive, diffusion, edm, fewstep, flow, imm, toy, var, xar  # noqa: F401  (each registers itself)


def _load_plugin(path: str, field: str) -> type[ModelFamily]:
    return load_plugin(path, field, ModelFamily, "model family")


def get_family(name: str, field: str = "model.family") -> type[ModelFamily]:
    _load_builtins()
    if ":" in name:
        return _load_plugin(name, field)
    if name in _FAMILIES:
        return _FAMILIES[name]
    for ep in entry_points(group="neon_ray.models"):
        if ep.name == name:
            return _load_plugin(ep.value, field)
    raise ConfigError(f"{field}: unknown model family {name!r}; known: {sorted(_FAMILIES)} or a module:attr plugin")


def known_families() -> list[str]:
    _load_builtins()
    return sorted(_FAMILIES)
