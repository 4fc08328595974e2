"""A non-interactive run drops exactly one line of Ray's (the constructor-arguments warning that every healthy run
prints) from its stderr: everything else, a child process's lines and a last line without a newline included,
passes through in order."""

from __future__ import annotations

import subprocess
import sys

NOISE = ("[2026-12-07 02:14:44,804 E 26552 26552] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(SamplerActor))' "
         "and ID: 'cf15' has constructor arguments in the object store and max_restarts > 0. If the arguments in the object "
         "store go out of scope or are lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 "
         "for more details.")
PROGRAM = f"""
import os, subprocess, sys
from neon_ray.runtime.stderr import drop_ray_constructor_argument_lines
drop_ray_constructor_argument_lines()
print("first", file=sys.stderr, flush=True)
os.write(2, {NOISE!r}.encode() + b"\\n")   # as Ray's C++ logging writes it
print("\\x1b[36m(TrainController pid=1)\\x1b[0m " + {NOISE!r}, file=sys.stderr, flush=True)  # as a forwarded worker line
print("core_worker.cc:10: Actor with class name: 'X' died unexpectedly", file=sys.stderr, flush=True)  # another Ray error
subprocess.run([sys.executable, "-c", "import sys; print('child', file=sys.stderr)"], check=True)
print("out", flush=True)
sys.stderr.write("last, no newline")
"""


def test_only_rays_constructor_argument_line_is_dropped():
    proc = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["first", "core_worker.cc:10: Actor with class name: 'X' died unexpectedly", "child",
                                        "last, no newline"]
    assert proc.stdout == "out\n"


def test_a_callers_redirected_stderr_is_left_alone():
    program = PROGRAM.replace("drop_ray_constructor_argument_lines()\n",
                              "import io; sys.stderr = io.StringIO(); drop_ray_constructor_argument_lines(); sys.stderr = sys.__stderr__\n")
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and sum("constructor arguments" in line for line in proc.stderr.splitlines()) == 2
