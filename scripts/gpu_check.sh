#!/usr/bin/env bash
# GPU check (scripts/gpu_check.py) on a machine with CUDA and PyTorch but no network:
#   bash scripts/gpu_check.sh                # cuda
#   bash scripts/gpu_check.sh --device cpu   # quick smoke anywhere
# Uses the project's .venv when there is one, else python3. Where distillcache is not
# installed, it is imported from this checkout through a package tree of symlinks in a
# temporary directory (the repository maps shared/, services/ and trainer/ into the
# package), so nothing is installed and no network is needed. Capped at 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python

if ! "$PY" -c "import distillcache.trainer" 2> /dev/null; then
  tree=$(mktemp -d)
  trap 'rm -rf "$tree"' EXIT
  mkdir "$tree/distillcache"
  ln -s "$repo"/distillcache/*.py "$tree/distillcache/"
  for part in shared services trainer; do
    ln -s "$repo/$part" "$tree/distillcache/$part"
  done
  export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
fi

# Offline: the check builds its model locally and must never wait on a hub.
HF_HUB_OFFLINE=1 timeout 300 "$PY" scripts/gpu_check.py "$@"
