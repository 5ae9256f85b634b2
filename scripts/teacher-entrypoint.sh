#!/bin/sh
# The teacher image's command line, kept in this one file: Dockerfile.teacher makes it
# the ENTRYPOINT, and tests/test_teacher_entrypoint.py runs it as it is, with the CPU
# backend, so the test exercises exactly what the container runs.
#
# Every setting comes from the environment (DISTILL_BACKEND, DISTILL_MODEL,
# DISTILL_DATA_ROOT, DISTILL_HOST, DISTILL_PORT, DISTILL_MAX_K, DISTILL_AUTH_TOKEN,
# DISTILL_QUEUE_SIZE, ...), which is where compose and `docker run -e` put them;
# arguments after the image name are passed on to `distill serve`.
set -eu

# CUDA forward compatibility (VLLM_ENABLE_CUDA_COMPATIBILITY=1, for NVIDIA drivers older
# than the image's CUDA needs): the image's compat libraries must come first on
# LD_LIBRARY_PATH when the server process starts. The dynamic loader reads that variable
# only at process start, so vLLM setting it from Python at import (which it does) reaches
# neither this process nor the engine process it forks; only processes it execs.
case "${VLLM_ENABLE_CUDA_COMPATIBILITY:-0}" in
  1 | [Tt][Rr][Uu][Ee])
    compat=${VLLM_CUDA_COMPATIBILITY_PATH:-/usr/local/cuda/compat}
    if [ ! -d "$compat" ]; then
      echo "distill-teacher: VLLM_ENABLE_CUDA_COMPATIBILITY is on but $compat does not exist;" \
        "set VLLM_CUDA_COMPATIBILITY_PATH to the CUDA compat directory, or turn it off" >&2
      exit 1
    fi
    export LD_LIBRARY_PATH="$compat${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    ;;
esac

# exec: the server becomes the container's main process, so `docker stop` (SIGTERM)
# reaches uvicorn directly and it drains in-flight requests before exiting.
exec distill serve "$@"
