"""Read the tensors out of an EDM-style network pickle (NVlabs/edm, lumalabs/imm releases) without running it.

Those releases `pickle.dump` a dict such as {"ema": <module>, "augment_pipe": …, "dataset_kwargs": {…}}
whose modules are instances of classes decorated by `torch_utils.persistence.persistent_class`: each
reduces to `_reconstruct_persistent_obj(meta)` with meta = {type: "class", version, module_src (the
whole source file of the class), class_name, state (the module's __dict__)}. Unpickling it normally
executes `module_src`. Here a `pickle.Unpickler` whose `find_class` returns only inert stand-ins
turns every record into plain data, and `edm_state_dict` walks the modules' `_parameters`/`_buffers`/
`_modules` into a flat state dict (`neon-ray convert` writes it as safetensors).

Globals it accepts (anything else stops the read with one line naming the file and the global, before
that global is looked up, let alone called):
- the persistence record `torch_utils.persistence._reconstruct_persistent_obj` → `PersistentRecord`
  (class name and state; the source is kept as text, never executed);
- tensor rebuilds: `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, `_rebuild_parameter_with_state`,
  `torch.storage._load_from_bytes` (a storage nested as torch.save bytes, read with torch's weights-only
  loader), torch storage types (`torch.FloatStorage`, …, as dtype tokens for the zip format's persistent
  ids) and torch dtypes (`torch.float32`, …);
- module and config objects as `Placeholder`s that only record their constructor arguments and state:
  classes under `torch.nn.modules.`, `timm.`, `training.`, `torch_utils.`, `dnnlib.` and `omegaconf.`;
- plain data: `collections.OrderedDict`, `builtins` set/frozenset/list/dict/tuple/object and the scalar
  types, `typing.Any`, `copyreg._reconstructor` (→ a Placeholder), numpy's array/scalar reconstructors.
A torch zip file (torch.save of the same dict) is read the same way, its storages by persistent id.
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import typing
import warnings
import zipfile
from collections.abc import Callable
from typing import Any

import torch

from ..errors import NeonError

PLACEHOLDER_PREFIXES = ("torch.nn.modules.", "timm.", "training.", "torch_utils.", "dnnlib.", "omegaconf.")
_PLAIN_BUILTINS = {"set", "frozenset", "list", "dict", "tuple", "object", "int", "float", "str", "bool", "bytes", "bytearray", "complex",
                   "slice", "range"}
_NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
          ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"), ("numpy", "dtype")}


class PersistentRecord:
    """A `persistent_class` instance as data: its class name, the source it carried (text) and its state."""

    def __init__(self, meta: Any):
        if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
            raise pickle.UnpicklingError("a persistence record without type 'class' and a class name")
        self.class_name: str = meta["class_name"]
        self.version = meta.get("version")
        self.module_src: str = str(meta.get("module_src", ""))
        self.state: dict = dict(meta.get("state") or {})


class Placeholder:
    """An instance of an accepted class, never constructed: the arguments and state it was pickled with."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any):  # pickle's NEWOBJ calls __new__ alone
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.entries, obj.list = args, kwargs, {}, {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any):  # REDUCE calls the class: nothing beyond __new__
        pass

    def __setitem__(self, key: Any, value: Any) -> None:  # a dict subclass's items (dnnlib.EasyDict)
        self.entries[key] = value

    def append(self, value: Any) -> None:  # a list subclass's items
        self.list.append(value)

    def extend(self, values: Any) -> None:
        self.list.extend(values)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict state, slots state)
            state = {**(state[0] or {}), **state[1]}
        self.state = state if isinstance(state, dict) else {"_state": state}

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


class _StorageType:
    """`torch.FloatStorage` & co. as a dtype token (the zip format names a storage's type in its persistent id)."""

    def __init__(self, name: str):
        self.name = name
        with warnings.catch_warnings():  # "TypedStorage is deprecated"
            warnings.simplefilter("ignore")
            self.dtype = getattr(torch, name).dtype

    def __call__(self, *args: Any) -> Any:
        raise pickle.UnpicklingError(f"torch.{self.name} called as a constructor")


def _load_storage_bytes(data: bytes) -> Any:
    # torch's own allow-listing unpickler; a storage saved on a GPU is read into CPU memory
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:  # copyreg._reconstructor, protocols 0/1
    if not (isinstance(cls, type) and issubclass(cls, Placeholder)):
        raise pickle.UnpicklingError("copyreg._reconstructor of a class that is not a placeholder")
    return cls()


class RefusedGlobal(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only the accepted globals (module docstring); persistent ids resolve through `storages` when given."""

    def __init__(self, file: Any, storages: Callable[[str, Any], Any] | None = None):
        super().__init__(file)
        self._storages = storages
        self._placeholders: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full == "torch_utils.persistence._reconstruct_persistent_obj":
            return PersistentRecord
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
            return getattr(torch._utils, name)
        if full == "torch.storage._load_from_bytes":
            return _load_storage_bytes
        if module == "torch" and name.endswith("Storage") and name[:1].isupper() and hasattr(torch, name):
            return _StorageType(name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if full == "collections.OrderedDict":
            return collections.OrderedDict
        if module in ("builtins", "__builtin__") and name in _PLAIN_BUILTINS:  # __builtin__: protocol-2 files (torch.save)
            return getattr(builtins, name)
        if full == "typing.Any":
            return typing.Any
        if full in ("copyreg._reconstructor", "copy_reg._reconstructor"):
            return _reconstructor
        if (module, name) in _NUMPY:
            import importlib

            return getattr(importlib.import_module(module), name)
        if module.startswith(PLACEHOLDER_PREFIXES) and name.isidentifier():
            if full not in self._placeholders:
                self._placeholders[full] = type(name, (Placeholder,), {"qualname": full, "__module__": __name__})
            return self._placeholders[full]
        raise RefusedGlobal(full)

    def persistent_load(self, pid: Any) -> Any:
        if self._storages is None or not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, _numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError("a storage whose type is not a torch storage type")
        return self._storages(str(key), storage_type.dtype)


def read_edm_pickle(path: str) -> Any:
    """The pickle's content with every module as a `PersistentRecord` or `Placeholder` (nothing of it executed)."""
    name = os.path.basename(path)
    try:
        if zipfile.is_zipfile(path):
            return _read_torch_zip(path)
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh).load()
    except RefusedGlobal as exc:
        raise NeonError(f"{name}: refused to unpickle global {exc.name} (not a tensor, a persistence record or a known plain "
                        "record); nothing in the file was run") from None
    except OSError as exc:
        raise NeonError(f"{name}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file raises many types
        raise NeonError(f"{name}: not a readable EDM network pickle ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None


def _read_torch_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise pickle.UnpicklingError("a zip file without data.pkl")
        root = pkl[: -len("data.pkl")]

        def storage(key: str, dtype: torch.dtype) -> Any:
            raw = bytearray(archive.read(f"{root}data/{key}"))
            untyped = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw else torch.UntypedStorage(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

        with archive.open(pkl) as fh:
            return RestrictedUnpickler(io.BytesIO(fh.read()), storages=storage).load()


def module_state_dict(module: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """A record's parameters and persistent buffers, recursively, as `nn.Module.state_dict()` names them."""
    state = getattr(module, "state", None)
    if not isinstance(state, dict):
        raise NeonError(f"{prefix or 'the network'}: not a pickled module (a {type(module).__name__})")
    out: dict[str, torch.Tensor] = {}
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if value is None or (kind == "_buffers" and name in skip):
                continue
            if not isinstance(value, torch.Tensor):
                raise NeonError(f"{prefix}{name}: a {type(value).__name__} where a tensor was expected")
            out[prefix + name] = value.detach().clone().contiguous()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out |= module_state_dict(child, f"{prefix}{name}.")
    return out


def edm_state_dict(path: str, key: str = "ema") -> dict[str, torch.Tensor]:
    """The state dict of `data[key]` in an EDM/IMM network pickle (keys as the official module's state_dict())."""
    data = read_edm_pickle(path)
    if not isinstance(data, dict) or key not in data:
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise NeonError(f"{os.path.basename(path)}: no {key!r} entry (has {have})")
    return module_state_dict(data[key])


def convert_edm_pickle(src: str, dst: str, key: str = "ema") -> dict[str, torch.Tensor]:
    """Write the tensors of `data[key]` in `src` to the safetensors file `dst`; returns them."""
    from safetensors.torch import save_file

    tensors = edm_state_dict(src, key)
    tmp = dst + ".tmp"
    save_file(tensors, tmp, metadata={"source": os.path.basename(src), "entry": key})
    os.replace(tmp, dst)
    return tensors
