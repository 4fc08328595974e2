"""`module:attr` plugins: a user's own model family or dataset, named in a config by its import path."""

from __future__ import annotations

import importlib

from .errors import ConfigError


def load_plugin(path: str, field: str, base: type, what: str) -> type:
    """The class at `path` ("package.module:Class"), which must subclass `base`; a failure is one line naming `field`."""
    module_name, _, attr = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{field}: cannot import {what} plugin {path!r} ({exc})") from None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ConfigError(f"{field}: {what} plugin {path!r} is not a {base.__name__} subclass ({base.__module__}.{base.__name__})")
    return obj
