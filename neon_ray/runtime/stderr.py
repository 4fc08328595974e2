"""One line of Ray's own that every healthy run prints, dropped from a non-interactive run's stderr.

Ray's core worker logs an error, from C++ and so past Python's logging, for each actor it creates whose constructor
arguments sit in the object store while the actor may restart (ray-project/ray#53727): Ray Data's actor pools
(our samplers and feature actors) and Ray Train's own controller actors always are such actors, and nothing a
caller passes changes that (ray-project/ray#57733). The line warns about a restart that never happens on a healthy
run, and it is one line per actor pool and training run. Only that exact message is dropped; every other line, Ray's
other errors included, passes through unchanged and in order. An interactive terminal is left alone.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

RAY_CONSTRUCTOR_ARGUMENTS = re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the "
                                       rb"object store and max_restarts > 0\.")
_installed = False


def drop_ray_constructor_argument_lines() -> None:
    """Route this process's stderr (file descriptor 2, which Ray's C++ logging and its forwarded worker logs write to)
    through a copier that drops RAY_CONSTRUCTOR_ARGUMENTS lines. Child processes inherit the filtered stderr. Once per
    process, and only where stderr is the process's own (not a caller's redirection) and not a terminal."""
    global _installed
    if _installed or sys.stderr is not sys.__stderr__ or sys.stderr.isatty():
        return
    _installed = True
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    terminal = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    copier = threading.Thread(target=_copy, args=(read_end, terminal), name="neon-ray-stderr", daemon=True)
    copier.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # the pipe's last write end in this process: the copier drains what is left, then stops
        copier.join(timeout=2.0)

    atexit.register(restore)


def _copy(read_end: int, terminal: int) -> None:
    try:
        with os.fdopen(read_end, "rb", buffering=0) as pipe, os.fdopen(terminal, "wb", buffering=0, closefd=False) as out:
            for line in _lines(pipe):
                if not RAY_CONSTRUCTOR_ARGUMENTS.search(line):
                    while line:
                        line = line[out.write(line):]
    except Exception:  # noqa: BLE001 - never leave writers blocked on a pipe nobody reads: give them the terminal back
        os.dup2(terminal, 2)


def _lines(pipe):
    """Lines as they arrive (a last line without a newline too), without waiting for a buffer to fill."""
    pending = b""
    while chunk := pipe.read(65536):
        pending += chunk
        *whole, pending = pending.split(b"\n")
        for line in whole:
            yield line + b"\n"
    if pending:
        yield pending
