"""fsspec storage helpers: every output path is a URI (local path, file://, s3://, gs://, memory://...).

Writes are atomic: data goes to a temporary name next to its target, then is renamed; a stage's
manifest is written last, so a crashed stage never looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from .errors import NeonError


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise NeonError(f"cannot open storage URI {uri!r}: {exc}") from exc


def is_local(uri: str) -> bool:
    fs, _ = filesystem(uri)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def ensure_writable(uri: str, field: str = "output") -> None:
    """Fail early, naming the field, when the output root cannot be written."""
    try:
        makedirs(uri)
        probe = join(uri, f".write-probe-{uuid.uuid4().hex}")
        fs, path = filesystem(probe)
        with fs.open(path, "wb") as fh:
            fh.write(b"ok")
        fs.rm(path)
    except NeonError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend error means "not writable"
        raise NeonError(f"{field}: cannot write to {uri!r} ({type(exc).__name__}: {exc})") from exc


def write_bytes_atomic(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    fs.mv(tmp, path)


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as fh:
        return fh.read()


def upload_file_atomic(local_path: str, uri: str) -> None:
    """Copy a finished local file to its URI via a temporary name, then rename."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    fs.put_file(local_path, tmp)
    fs.mv(tmp, path)


def publish_dir(local_dir: str, uri: str) -> None:
    """Move/copy a finished local directory to `uri`, replacing what was there (atomic for local)."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if is_local(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.move(local_dir, path)
    else:
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.put(local_dir.rstrip("/") + "/", tmp, recursive=True)
        fs.mv(tmp, path, recursive=True)


@contextlib.contextmanager
def local_copy(uri: str, what: str = "file") -> Iterator[str]:
    """A local filesystem path for `uri` (the path itself when local, else a temp download)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise NeonError(f"{what} not found: {uri}")
    if is_local(uri):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="neon-ray-") as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        fs.get(path, local, recursive=fs.isdir(path))
        yield local


@contextlib.contextmanager
def staging_dir(uri: str) -> Iterator[str]:
    """A local scratch dir for outputs destined for `uri`: same filesystem when local (rename is atomic)."""
    if is_local(uri):
        _, path = filesystem(uri)
        parent = os.path.dirname(path.rstrip("/")) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".staging-", dir=parent)
    else:
        tmp = tempfile.mkdtemp(prefix="neon-ray-staging-")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_local_path(uri: str) -> str:
    """Strip a file:// scheme; leave other URIs unchanged (for libraries that take either)."""
    return uri[len("file://"):] if uri.startswith("file://") else uri
