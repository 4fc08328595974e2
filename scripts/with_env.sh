#!/usr/bin/env bash
# Run a command inside the project's environment, setting it up first when needed:
#   the pinned venv (scripts/setup_env.sh), this checkout installed editable (console script
#   `neon-ray`), and Fashion-MNIST from Debian's dataset-fashion-mnist where apt-get is usable.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/setup_env.sh")
py="$venv/bin/python"

# This checkout, installed editable (cheap check first: the venv is shared by every clone).
# -I and cd /: ask where the *installed* neon_ray lives, not the one the current directory would
# shadow it with (the console script `neon-ray` never sees the current directory).
where=$(cd / && "$py" -I -c 'import neon_ray, os; print(os.path.dirname(os.path.dirname(os.path.abspath(neon_ray.__file__))))' 2>/dev/null || true)
if [ "$where" != "$root" ] || [ ! -x "$venv/bin/neon-ray" ]; then
  echo "[setup] installing $root into $venv (editable)" >&2
  "$py" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$root" >/dev/null 2>&1 \
    || "$py" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$root"
fi

# Fashion-MNIST: Debian's package when possible; otherwise neon-ray downloads it on first use.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing Debian package dataset-fashion-mnist" >&2
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) \
    || echo "[setup] apt-get could not install dataset-fashion-mnist; it will be downloaded on first use" >&2
fi

export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
exec "$@"
