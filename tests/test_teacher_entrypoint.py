"""The teacher image's command line, run here as the container runs it.

Docker does not run on the build machines, so this is the closest check of the image
that can run: the script the image's ENTRYPOINT names (scripts/teacher-entrypoint.sh),
in an environment made of exactly what the container gets, the Dockerfile's ENV and the
CPU compose service's `environment` at their defaults, with only the machine-specific
values replaced: a tiny local model instead of a hub id, temporary directories instead
of the volumes, loopback and a free port. Then the Dockerfile's own HEALTHCHECK command
must pass, /readyz must be ready, and /v1/score must answer with the teacher's top-k.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from distillcache.services.teacher.readiness import free_port
from distillcache.shared.tiny_models import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.teacher"
SCRIPT = ROOT / "scripts" / "teacher-entrypoint.sh"
READY_TIMEOUT_S = 180
# ${NAME:-default}: compose's interpolation, resolved to the default (no .env).
_VARIABLE = re.compile(r"(?<!\$)\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-(?P<default>[^}]*))?\}")

pytestmark = pytest.mark.slow


def _dockerfile_instruction(name: str) -> str:
    """The arguments of the last ``name`` instruction, line continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found = re.findall(rf"^{name} (.+)$", joined, re.M)
    assert found, f"Dockerfile.teacher has no {name}"
    return found[-1]


def _image_env() -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", _dockerfile_instruction("ENV")))


def _cpu_service_env() -> dict[str, str]:
    # Like compose: parse first, then interpolate each string (so "${X:-}" is "", not null).
    env = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["teacher-cpu"]
    return {
        name: _VARIABLE.sub(lambda m: m["default"] or "", str(value)).replace("$$", "$")
        for name, value in env["environment"].items()
    }


def _container_env(model_dir: Path, data_root: Path, home: Path, port: int) -> dict[str, str]:
    env = {**_image_env(), **_cpu_service_env()}
    machine_specific = {
        "DISTILL_MODEL": str(model_dir),
        "DISTILL_DATA_ROOT": str(data_root),
        "DISTILL_HOST": "127.0.0.1",
        "DISTILL_PORT": str(port),
        "HOME": str(home),
        "HF_HOME": str(home / "huggingface"),
    }
    # Replaced, never added: anything else the test set would make it test another image.
    assert set(machine_specific) <= set(env), set(machine_specific) - set(env)
    env.update(machine_specific)
    # The image has `distill` on its PATH; here it lives beside this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.defpath}"
    return env


@contextlib.contextmanager
def _running(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """The entrypoint as ENTRYPOINT runs it (exec form: the script itself, no arguments)."""
    entrypoint = json.loads(_dockerfile_instruction("ENTRYPOINT"))
    assert entrypoint == ["/usr/local/bin/distill-teacher"], entrypoint
    assert re.search(
        r"^COPY (--chmod=\d+ )?scripts/teacher-entrypoint\.sh /usr/local/bin/distill-teacher$",
        DOCKERFILE.read_text(),
        re.M,
    ), "ENTRYPOINT must be scripts/teacher-entrypoint.sh, or this test runs something else"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(SCRIPT)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_ready(client: httpx.Client, proc: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log.read_text()}"
        with contextlib.suppress(httpx.TransportError):
            response = client.get("/readyz")
            body = response.json()
            assert body.get("status") != "failed", body
            if response.status_code == 200:
                return body
        time.sleep(0.5)
    pytest.fail(f"/readyz not ready within {READY_TIMEOUT_S} s:\n{log.read_text()}")


def _healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess:
    """The Dockerfile's HEALTHCHECK command, run by the same shell form."""
    command = json.loads(_dockerfile_instruction("HEALTHCHECK").split(" CMD ", 1)[1])
    return subprocess.run(command, env=env, capture_output=True, timeout=30)


def _stop_gracefully(proc: subprocess.Popen, log: Path) -> None:
    """`docker stop`: SIGTERM to the container's main process, which must be the server
    itself (the script execs it) and must shut down on its own, well before Docker's
    SIGKILL. uvicorn exits by re-raising the signal after a clean shutdown (Docker shows
    143), so the log, not the return code, tells a clean shutdown."""
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    assert b"serve" in cmdline, f"the main process is not the server: {cmdline}"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("teacher"), tokenizer_dir)


def test_image_command_line_serves_readyz_and_scores(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = _container_env(model_dir, tmp_path / "data", tmp_path / "home", port)
    assert env["DISTILL_BACKEND"] == "transformers"  # the CPU profile's default backend
    log = tmp_path / "server.log"
    with (
        _running(env, log) as proc,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client,
    ):
        ready = _wait_ready(client, proc, log)
        assert ready["backend"] == "transformers" and ready["max_k"] == int(env["DISTILL_MAX_K"])
        if shutil.which("curl"):  # the vLLM images have it; a bare dev box may not
            health = _healthcheck(env)
            assert health.returncode == 0, health

        pair = {"prompt": "What is 17 + 25?", "completion": "17 + 25 = 42. The answer is 42."}
        response = client.post("/v1/score", json={"pairs": [pair], "k": 8})
        assert response.status_code == 200, response.text
        [answer] = response.json()["results"]
        positions = len(answer["completion_ids"])
        assert positions > 0 and answer["logprob_start"] == len(answer["prompt_ids"])
        assert len(answer["topk_ids"]) == len(answer["topk_logprobs"]) == positions
        assert all(len(row) == 8 for row in answer["topk_ids"])
        for row in answer["topk_logprobs"]:
            assert row == sorted(row, reverse=True) and all(lp <= 0 for lp in row)
        assert not answer["cached"]

        # The same request again comes from the store under the data root, not the model.
        again = client.post("/v1/score", json={"pairs": [pair], "k": 8}).json()["results"][0]
        assert again["cached"] and again["topk_ids"] == answer["topk_ids"]

        _stop_gracefully(proc, log)


def test_image_command_line_with_auth_token_keeps_probes_open(
    model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = _container_env(model_dir, tmp_path / "data", tmp_path / "home", port)
    env["DISTILL_AUTH_TOKEN"] = "s3cret"  # what TEACHER_AUTH_TOKEN=s3cret in .env sets
    log = tmp_path / "server.log"
    with (
        _running(env, log) as proc,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client,
    ):
        _wait_ready(client, proc, log)  # the HEALTHCHECK needs /readyz without a token
        body = {"pairs": [{"prompt": "Hi", "completion": "Hello."}], "k": 4}
        assert client.post("/v1/score", json=body).status_code == 401
        authorized = client.post("/v1/score", json=body, headers={"Authorization": "Bearer s3cret"})
        assert authorized.status_code == 200, authorized.text
        _stop_gracefully(proc, log)


def _environ_after_exec(proc: subprocess.Popen, log: Path) -> dict[str, str]:
    """The environment the server process started with, read once the script has exec'd
    it (its command line then names `serve`): what the dynamic loader saw."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited ({proc.returncode}):\n{log.read_text()}"
        if b"serve" in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
            raw = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            return dict(item.decode().split("=", 1) for item in raw if b"=" in item)
        time.sleep(0.05)
    pytest.fail(f"the script did not exec the server:\n{log.read_text()}")


@pytest.mark.parametrize("enabled", ["1", "0"])
def test_cuda_compatibility_libraries_come_first_when_the_server_starts(
    enabled: str, model_dir: Path, tmp_path: Path
) -> None:
    """VLLM_ENABLE_CUDA_COMPATIBILITY (the GPU service passes it) takes effect before the
    server starts: setting LD_LIBRARY_PATH later, from Python, does not reach the loader."""
    compat = tmp_path / "compat"
    compat.mkdir()
    env = _container_env(model_dir, tmp_path / "data", tmp_path / "home", free_port())
    env |= {
        "VLLM_ENABLE_CUDA_COMPATIBILITY": enabled,
        "VLLM_CUDA_COMPATIBILITY_PATH": str(compat),
        "LD_LIBRARY_PATH": "/opt/host-libs",
    }
    log = tmp_path / "server.log"
    with _running(env, log) as proc:
        started = _environ_after_exec(proc, log)
    expected = f"{compat}:/opt/host-libs" if enabled == "1" else "/opt/host-libs"
    assert started["LD_LIBRARY_PATH"] == expected


def test_cuda_compatibility_without_its_libraries_is_a_one_line_startup_failure(
    model_dir: Path, tmp_path: Path
) -> None:
    env = _container_env(model_dir, tmp_path / "data", tmp_path / "home", free_port())
    missing = tmp_path / "no-compat"
    env |= {"VLLM_ENABLE_CUDA_COMPATIBILITY": "true", "VLLM_CUDA_COMPATIBILITY_PATH": str(missing)}
    done = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert str(missing) in line and "VLLM_CUDA_COMPATIBILITY_PATH" in line
