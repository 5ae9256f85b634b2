#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py) in one call, on a machine with CUDA PyTorch and
# nothing else: no network, no model hub, no install of this project.
#
#   bash scripts/gpu_check.sh                        # CUDA, a few minutes
#   bash scripts/gpu_check.sh --device cpu           # a quick smoke test anywhere
#   PYTHON=/opt/conda/bin/python bash scripts/gpu_check.sh
#
# PYTHON: the interpreter to measure (default: the project's .venv when there is one,
# else python3); its PyTorch is the one checked. What it lacks besides torch comes from
# the wheel folder (GPU_CHECK_WHEELS, default gpu-check-wheels/ in the checkout, built by
# scripts/gpu_check_wheels.sh where PyPI is reachable), and distillcache from this
# checkout; scripts/gpu_check_env.py sets that up in a temporary directory and stops
# with one clear message when something cannot be imported. Capped at 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
WHEELS=${GPU_CHECK_WHEELS:-$repo/gpu-check-wheels}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" scripts/gpu_check_env.py --repo "$repo" --wheels "$WHEELS" --into "$work" > "$work/env"
head -n -1 "$work/env"
PYTHONPATH="$(tail -n 1 "$work/env")${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH

# Offline: the check builds its model locally and must never wait on a hub.
HF_HUB_OFFLINE=1 timeout 600 "$PY" scripts/gpu_check.py "$@"
