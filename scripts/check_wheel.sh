#!/usr/bin/env bash
# The package as users get it (CI runs this after `make test`): build the wheel, install it with --no-deps into an
# empty target folder, then, from an empty folder, run `neon-ray configs` and `neon-ray run tiny` with only that
# folder and the pinned dependencies' venv on the path: no checkout, so a file the wheel lacks (a config, the
# quickstart base, a package) fails here. First, the sources against the oldest Python the package declares
# (vermin: syntax and standard library; scripts/check_pythons.sh installs and runs the package on 3.10 and 3.12).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=$(bash "$root/scripts/setup_env.sh" --deps)
py="$deps/bin/python"
work=$(mktemp -d "${TMPDIR:-/tmp}/neon-ray-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
log() { echo "[check_wheel] $*" >&2; }

python3 -m venv "$work/vermin" && "$work/vermin/bin/pip" install -q --disable-pip-version-check vermin==1.9.2 >&2
"$work/vermin/bin/vermin" --target=3.10- --no-tips --violations --eval-annotations --backport typing "$root/neon_ray" "$root/tuning" >&2
log "the sources need no Python newer than 3.10 (vermin)"

t0=$SECONDS
# No build isolation: the venv's setuptools (≥ 77, the license field) builds it offline.
(cd "$root" && "$py" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation . -w "$work/dist" >&2)
wheel=$(ls "$work"/dist/neon_ray-*.whl)
log "built $(basename "$wheel") in $((SECONDS - t0)) s"
"$py" - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["neon_ray/configs/tiny.yaml", "neon_ray/configs/quickstart.yaml", "neon_ray/configs/checkpoints/fmnist-unet-p2s.safetensors",
        "neon_ray/assets/fmnist_classifier.safetensors", "neon_ray/runtime/ray_data_logging.yaml", "tuning/__init__.py"]
missing = [n for n in need if n not in names]
assert not missing, f"the wheel lacks {missing}"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the wheel lacks LICENSE"
assert not any(n.startswith(("tests/", "jobs/", "benchmarks/", "scripts/")) for n in names), "the wheel carries non-package folders"
PY
"$py" -m pip install -q --disable-pip-version-check --no-deps --target "$work/site" "$wheel" >&2

mkdir "$work/empty"; cd "$work/empty"
export PYTHONPATH="$work/site" MLFLOW_TRACKING_URI=""
unset VIRTUAL_ENV
exe="$work/site/bin/neon-ray"
"$py" -c 'import neon_ray, sys; assert neon_ray.__file__.startswith(sys.argv[1]), neon_ray.__file__' "$work/site"
"$exe" --version
"$exe" configs >/dev/null
t0=$SECONDS
"$exe" run tiny --output "$work/out"
log "neon-ray run tiny from the wheel: $((SECONDS - t0)) s"
test -f "$work/out/summary.json"
