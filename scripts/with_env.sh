#!/usr/bin/env bash
# Run a command inside the project's environment, setting it up first when needed:
#   this clone's venv (scripts/setup_env.sh: this checkout installed editable, over the pinned dependencies'
#   venv that every clone shares), and Fashion-MNIST from Debian's dataset-fashion-mnist where apt-get is usable.
# The checkout also goes first on PYTHONPATH: the shared venv's own commands (`ray start`, `mlflow server`) run
# the shared python, which does not see this clone's install, and the Ray workers they start must import it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/setup_env.sh")

# Fashion-MNIST: Debian's package when possible; otherwise neon-ray downloads it on first use.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing Debian package dataset-fashion-mnist" >&2
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) \
    || echo "[setup] apt-get could not install dataset-fashion-mnist; it will be downloaded on first use" >&2
fi

export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv" PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
