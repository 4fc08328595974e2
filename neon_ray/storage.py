"""fsspec storage: every output path is a URI (local path, file://, s3://, gs://, any fsspec filesystem).

Writes are atomic: data goes to a temporary name next to its target, then is renamed; a stage's
manifest is written last, so a crashed stage never looks complete. Files under a run's output root
are recorded by their path *relative to that root* (`relative`/`resolve`), so an output directory can
be moved or copied and rerun in place.

Object stores (s3, gs, azure) have no directories: `makedirs` is a no-op there, because s3fs's mkdir
would otherwise *create a missing bucket* instead of reporting it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from .errors import NeonError

OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}
# Filesystems that live inside one process: Ray workers (other processes, other nodes) cannot see them.
PROCESS_LOCAL = {"memory"}
PROBE_SECONDS = 30.0
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def redact_uri(text: str) -> str:
    """`scheme://user:secret@host/...` → `scheme://***@host/...` anywhere in `text`."""
    return _USERINFO.sub(lambda m: m.group("scheme") + "***@", text)


def without_userinfo(uri: str) -> str:
    """`scheme://user:secret@host/...` → `scheme://host/...` (an address to show or compare, credentials dropped)."""
    return _USERINFO.sub(lambda m: m.group("scheme"), uri)


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    # No listing cache on object stores: Ray workers in other processes write objects this process must see.
    options = {"use_listings_cache": False} if scheme(uri) in OBJECT_STORES else {}
    try:
        return url_to_fs(uri, **options)
    except (ImportError, ValueError) as exc:
        raise NeonError(f"cannot open storage URI {redact_uri(uri)!r}: {exc}") from exc


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return set(fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def is_local(uri: str) -> bool:
    return bool(_protocols(filesystem(uri)[0]) & {"file", "local"})


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(_protocols(fs) & OBJECT_STORES)


def check_shareable(uri: str, field: str = "output") -> None:
    """Refuse an output that Ray workers in other processes cannot reach (checked at config load)."""
    if scheme(uri) in PROCESS_LOCAL:
        raise NeonError(f"{field}: {scheme(uri)}:// exists only inside one process, and Ray workers run in others; "
                        "use a local path or shared storage (s3://, gs://, a shared mount)")


# ----------------------------------------------------------------------------------------------
# Paths relative to a run's output root


def relative(root: str, uri: str) -> str:
    """`uri` as a path relative to `root` when it lies under it, else `uri` unchanged (an input from elsewhere)."""
    root = root.rstrip("/")
    return uri[len(root) + 1:] if uri.startswith(root + "/") else uri


def resolve(root: str, path: str) -> str:
    """Inverse of `relative`: a relative path is taken under `root`; absolute paths and URIs stay as they are."""
    if "://" in path or path.startswith("/"):
        return path
    return join(root, path)


# ----------------------------------------------------------------------------------------------
# Basic operations


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def file_stamp(info: dict) -> str:
    """What changes when a file's content does, as cheaply as the filesystem tells it: an mtime, or an object's etag."""
    return str(info.get("mtime", info.get("LastModified", info.get("ETag", info.get("etag", "")))))


def file_identity(uri: str, field: str) -> str:
    """A cheap identity of one file (a checkpoint) for config hashes: its URI, size and mtime (or an etag remotely); a
    missing file is one line naming `field`."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise NeonError(f"{field}: file not found: {redact_uri(uri)}")
    info = fs.info(path)
    return json.dumps({"uri": redact_uri(uri), "size": info.get("size"), "mtime": file_stamp(info)})


def content_identity(uri: str) -> dict | None:
    """A cheap identity of a file's or a folder's content: how many files, their bytes, and a digest of every
    file's relative name, size and stamp (no file is read). None when nothing is there."""
    import hashlib

    fs, path = filesystem(uri)
    if not fs.exists(path):
        return None
    if fs.isdir(path):
        found = fs.find(path, detail=True)
        rows = sorted((p[len(path.rstrip("/")) + 1:], info.get("size"), file_stamp(info)) for p, info in found.items())
    else:
        info = fs.info(path)
        rows = [("", info.get("size"), file_stamp(info))]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    return {"files": len(rows), "bytes": sum(size or 0 for _, size, _ in rows), "digest": digest}


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if not is_object_store(fs):
        fs.makedirs(path, exist_ok=True)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _parent_dirs(fs, path: str) -> None:
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and not is_object_store(fs):
        fs.makedirs(parent, exist_ok=True)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    _parent_dirs(fs, path)
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
    _parent_dirs(fs, path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    fs.put_file(local_path, tmp)
    fs.mv(tmp, path)


@contextlib.contextmanager
def local_copy(uri: str, what: str = "file") -> Iterator[str]:
    """A local filesystem path for `uri` (the path itself when local, else a temp download)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise NeonError(f"{what} not found: {redact_uri(uri)}")
    if is_local(uri):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="neon-ray-") as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        fs.get(path, local, recursive=fs.isdir(path))
        yield local


def remove_temporaries(root: str) -> int:
    """Delete the temporary files of interrupted atomic writes (`*.tmp-<hex>`, this module's own names) under `root`."""
    fs, path = filesystem(root)
    if not fs.exists(path):
        return 0
    stale = [p for p in fs.find(path, withdirs=True) if re.search(r"\.tmp-[0-9a-f]{8,}$", p.rstrip("/"))]
    for p in sorted(stale, key=len, reverse=True):
        if fs.exists(p):
            fs.rm(p, recursive=True)
    return len(stale)


def to_local_path(uri: str) -> str:
    """Strip a file:// scheme; leave other URIs unchanged (for libraries that take either)."""
    return uri[len("file://"):] if uri.startswith("file://") else uri


def pyarrow_filesystem(uri: str):
    """(pyarrow filesystem, path) for Ray Data and Ray Train/Tune storage: the fsspec filesystem behind `uri`,
    so any scheme (and its credentials and endpoint from the environment) works the same way everywhere."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if is_local(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# ----------------------------------------------------------------------------------------------
# Checking an output root before any work


def ensure_writable(uri: str, field: str = "output") -> None:
    """Fail early, naming the field and the URI, when the output root cannot be written.

    Writes and deletes a probe object; gives up after PROBE_SECONDS (an endpoint that does not answer
    would otherwise be retried for minutes by the storage client).
    """
    check_shareable(uri, field)
    outcome: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            fs, path = filesystem(uri)
            if not is_object_store(fs):
                fs.makedirs(path, exist_ok=True)
            probe_path = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex}"
            with fs.open(probe_path, "wb") as fh:
                fh.write(b"ok")
            fs.rm(probe_path)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - classified below
            outcome["error"] = exc

    thread = threading.Thread(target=probe, daemon=True, name="neon-ray-storage-probe")
    thread.start()
    thread.join(PROBE_SECONDS)
    shown = redact_uri(uri)
    if thread.is_alive():
        raise NeonError(f"{field}: no answer from the storage behind {shown!r} within {PROBE_SECONDS:.0f} s "
                        "(check the endpoint, e.g. AWS_ENDPOINT_URL, and the network)")
    exc = outcome.get("error")
    if exc is None:
        return
    if isinstance(exc, NeonError):
        raise exc
    raise NeonError(f"{field}: cannot write to {shown!r}: {describe_storage_error(exc)}") from None


def describe_storage_error(exc: BaseException) -> str:
    """A short reason for a storage failure, without credentials."""
    text = redact_uri(" ".join(str(exc).split()))[:240]
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
        return f"the bucket or path does not exist ({name}: {text})"
    if any(k in text for k in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidClientTokenId", "ExpiredToken",
                               "signature we calculated", "Access Key Id you provided")):
        return f"the credentials were rejected (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the node's instance profile) ({name}: {text})"
    if isinstance(exc, PermissionError) or any(k in text for k in ("AccessDenied", "Access Denied", "Forbidden")):
        return f"access denied: these credentials may not write under this prefix ({name}: {text})"
    if "Could not connect" in text or "EndpointConnectionError" in name or "ConnectionError" in name or "Connect" in name:
        return f"cannot reach the storage endpoint ({name}: {text})"
    return f"{name}: {text}"
