#!/usr/bin/env bash
# Builds gpu-check-wheels/: every package scripts/gpu_check.sh needs besides PyTorch, as
# wheels, so the GPU check runs on an offline machine that has only Python and CUDA
# PyTorch. Run it where PyPI is reachable, then copy the folder (64 MiB at most; the
# script refuses more) with the checkout to the GPU machine:
#
#   bash scripts/gpu_check_wheels.sh                       # for this machine's Python
#   PYTHON_VERSION=3.12 bash scripts/gpu_check_wheels.sh   # for another Python (Linux x86_64)
#   PLATFORM=manylinux_2_28_aarch64 PYTHON_VERSION=3.12 bash scripts/gpu_check_wheels.sh
#
# The packages and their version ranges come from pyproject.toml (the names below select
# them; pip resolves their dependencies). torch is left out on purpose: the GPU machine's
# own CUDA build is the one to measure, and the script fails if anything pulled it in.
# distillcache itself is not a wheel here: gpu_check.sh imports it from the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu-check-wheels}
LIMIT_MIB=64
# What gpu_check.py imports outside the standard library and torch: the transformers
# backend and its tokenizer (transformers, tokenizers), numpy, and the trainer's loss
# configuration (pydantic, pyyaml).
NEEDED="transformers tokenizers numpy pydantic pyyaml"

requirements=$(python3 - "$NEEDED" <<'PY'
import re, sys, tomllib
needed = sys.argv[1].split()
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
by_name = {re.match(r"[A-Za-z0-9_.-]+", d)[0].lower(): d for d in deps}
missing = [n for n in needed if n not in by_name]
if missing:
    sys.exit(f"gpu_check_wheels: pyproject.toml does not list {', '.join(missing)}")
print("\n".join(by_name[n] for n in needed))
PY
)

target=()
if [ -n "${PYTHON_VERSION:-}" ] || [ -n "${PLATFORM:-}" ]; then
  # Another interpreter than this one: binary wheels only, for its version and platform
  # (by default Linux x86_64, either manylinux tag the packages publish).
  target=(--only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}")
  for platform in ${PLATFORM:-manylinux_2_28_x86_64 manylinux2014_x86_64}; do
    target+=(--platform "$platform")
  done
fi

rm -rf "$OUT"
mkdir -p "$OUT"
# shellcheck disable=SC2086
python3 -m pip download -q --dest "$OUT" "${target[@]}" $requirements

if found=$(ls "$OUT" | grep -iE '^(torch|nvidia|triton)[-_]'); then
  echo "gpu_check_wheels: a dependency pulled in $found; the GPU machine's own torch must be used" >&2
  exit 1
fi
size=$(du -sm "$OUT" | cut -f1)
if [ "$size" -gt "$LIMIT_MIB" ]; then
  echo "gpu_check_wheels: $OUT is $size MiB, over the $LIMIT_MIB MiB it may take" >&2
  exit 1
fi
echo "$OUT: $(ls "$OUT" | wc -l) wheels, $(du -sh "$OUT" | cut -f1)"
