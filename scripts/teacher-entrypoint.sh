#!/bin/sh
# The teacher image's command line, kept in this one file: Dockerfile.teacher makes it
# the ENTRYPOINT, and tests/test_teacher_entrypoint.py runs it as it is, with the CPU
# backend, so the test exercises exactly what the container runs.
#
# Every setting comes from the environment (DISTILL_BACKEND, DISTILL_MODEL,
# DISTILL_DATA_ROOT, DISTILL_HOST, DISTILL_PORT, DISTILL_MAX_K, DISTILL_AUTH_TOKEN,
# DISTILL_QUEUE_SIZE, ...), which is where compose and `docker run -e` put them;
# arguments after the image name are passed on to `distill serve`.
#
# exec: the server becomes the container's main process, so `docker stop` (SIGTERM)
# reaches uvicorn directly and it drains in-flight requests before exiting.
set -eu
exec distill serve "$@"
