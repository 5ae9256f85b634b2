# Two commands a newcomer needs: `make demo` (the main job) and `make test`.
.PHONY: setup test test-fast demo lint

setup:
	bash scripts/setup_env.sh

test: setup
	bash scripts/lint_docker.sh
	.venv/bin/python -m pytest

test-fast: setup
	.venv/bin/python -m pytest -m "not slow"

demo: setup
	.venv/bin/distill demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
