#!/usr/bin/env bash
# `pip install` of the package as a user does it, on each Python the package declares (3.10-3.12), each in a
# fresh virtual environment resolving the ranges in pyproject.toml from the index (not the lock): torch first,
# then the wheel with its `deepspeed` extra without build isolation (README, "Install"), then `neon-ray
# --version`, `neon-ray configs` and `neon-ray run tiny` from an empty folder. Not part of `make test`: each
# Python downloads its own torch (several GB of CUDA wheels on x86_64) and runs the tiny pipeline (~4 min).
#
#   bash scripts/check_pythons.sh [3.10 3.12 ...]     # default: 3.10 3.11 3.12
#
# An interpreter is looked up as python3.X on PATH, then in pyenv's versions folder. Prints one line per Python:
# its version, what pip resolved for the main dependencies, and the tiny run's result; exit 1 if any failed.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -eq 0 ]; then versions=(3.10 3.11 3.12); else versions=("$@"); fi
work=${CHECK_PYTHONS_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/neon-ray-pythons.XXXXXX")}
log() { echo "[check_pythons] $*" >&2; }
pip_flags=(-q --disable-pip-version-check --no-warn-script-location)

find_python() {
  local v=$1 candidate
  # (a pyenv shim on PATH answers `command -v` but fails to run another version: ask each one its version)
  for candidate in "$(command -v "python$v" 2>/dev/null)" $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python"$v" 2>/dev/null | sort -rV); do
    [ -n "$candidate" ] && "$candidate" -c 'import sys; sys.exit(f"{sys.version_info[0]}.{sys.version_info[1]}" != sys.argv[1])' "$v" 2>/dev/null \
      && { echo "$candidate"; return; }
  done
}

deps=$(bash "$root/scripts/setup_env.sh" --deps)
mkdir -p "$work/dist"
(cd "$root" && "$deps/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation . -w "$work/dist" >&2) \
  || { echo "building the wheel failed"; exit 1; }
wheel=$(ls "$work"/dist/neon_ray-*.whl)
log "wheel: $wheel"

failed=0
for v in "${versions[@]}"; do
  py=$(find_python "$v")
  if [ -z "$py" ]; then echo "python $v: no interpreter found (python$v on PATH or pyenv)"; failed=1; continue; fi
  env="$work/venv-$v"; out="$work/run-$v"; rm -rf "$env" "$out"
  t0=$SECONDS
  pip=("$env/bin/python" -m pip install "${pip_flags[@]}")
  if ! { "$py" -m venv "$env" && "${pip[@]}" --upgrade pip "setuptools>=77" wheel >&2 &&
         "${pip[@]}" "torch>=2.4,<3" >&2 &&
         DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "$wheel[deepspeed]" >&2; }; then
    echo "python $v: pip install failed"; failed=1; continue
  fi
  installed=$("$env/bin/python" - <<'PY'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("torch", "ray", "mlflow", "deepspeed", "pydantic", "pyarrow", "numpy")))
PY
)
  log "python $v: installed in $((SECONDS - t0)) s: $installed"
  mkdir -p "$work/empty-$v"
  t0=$SECONDS
  if (cd "$work/empty-$v" && unset PYTHONPATH VIRTUAL_ENV && export MLFLOW_TRACKING_URI="" &&
      "$env/bin/neon-ray" --version && "$env/bin/neon-ray" configs >/dev/null &&
      "$env/bin/neon-ray" run tiny --output "$out" > "$work/run-$v.log" 2>&1) && [ -f "$out/summary.json" ]; then
    echo "python $v ($("$env/bin/python" -V 2>&1)): ok, neon-ray run tiny in $((SECONDS - t0)) s; $installed"
  else
    echo "python $v: neon-ray run tiny failed (log: $work/run-$v.log)"; tail -20 "$work/run-$v.log" >&2; failed=1
  fi
done
exit $failed
