"""scripts/gpu_check.sh: the environment check that runs before anything is measured, and
the smoke run itself.

The environment check is what a user on an offline GPU machine meets first, so its
failures are tested as they appear there: an interpreter without PyTorch, a wheel folder
built for another Python, a module found nowhere. Each must stop with exit status 3 and
one line that names the problem and the fix. The smoke run is the whole check on CPU
(`--device cpu`), as scripts/gpu_check.sh runs it.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV_CHECK = ROOT / "scripts" / "gpu_check_env.py"


def _env_check(python: str, wheels: Path, into: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, str(ENV_CHECK), "--repo", str(ROOT), "--wheels", str(wheels), "--into", str(into)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_interpreter_without_torch_is_told_to_set_python(tmp_path: Path) -> None:
    system = Path("/usr/bin/python3")
    probe = subprocess.run([str(system), "-c", "import torch"], capture_output=True)
    if not system.exists() or probe.returncode == 0:
        pytest.skip("needs a system python3 without torch")
    done = _env_check(str(system), tmp_path / "no-wheels", tmp_path / "work")
    assert done.returncode == 3
    [line] = done.stderr.splitlines()
    assert "cannot import torch" in line and "set PYTHON=" in line


def test_a_wheel_for_another_python_names_itself_and_the_rebuild(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # A distribution this interpreter does not have, built for a Python it is not.
    name = "distillcache_probe-1.0-cp39-cp39-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(wheels / name, "w") as archive:
        archive.writestr("distillcache_probe/__init__.py", "")
    done = _env_check(sys.executable, wheels, tmp_path / "work")
    assert done.returncode == 3
    [line] = done.stderr.splitlines()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert name in line and f"PYTHON_VERSION={version} bash scripts/gpu_check_wheels.sh" in line


def test_wheels_fill_only_what_the_interpreter_lacks(tmp_path: Path) -> None:
    """A pure-Python wheel of a missing distribution is unpacked and importable; one the
    interpreter already has (numpy here) is left to the interpreter."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for dist, module in (("distillcache_probe", "distillcache_probe"), ("numpy", "numpy")):
        with zipfile.ZipFile(wheels / f"{dist}-1.0-py3-none-any.whl", "w") as archive:
            archive.writestr(f"{module}/__init__.py", "FROM_THE_WHEEL_FOLDER = True\n")
            archive.writestr(f"{dist}-1.0.dist-info/METADATA", f"Name: {dist}\nVersion: 1.0\n")
    done = _env_check(sys.executable, wheels, tmp_path / "work")
    assert done.returncode == 0, done.stderr
    assert "distillcache-probe 1.0" in done.stdout and "numpy" not in done.stdout
    path = done.stdout.splitlines()[-1]
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import distillcache_probe, numpy, distillcache.trainer.sparse_kd;"
            "print(distillcache_probe.FROM_THE_WHEEL_FOLDER, hasattr(numpy, 'FROM_THE_WHEEL_FOLDER'))",
        ],
        env={"PYTHONPATH": path},
        capture_output=True,
        text=True,
    )
    assert imported.stdout.split() == ["True", "False"], imported.stderr


@pytest.mark.slow
def test_cpu_smoke_run_prints_every_figure(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--no-vllm"],
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1",
            "GPU_CHECK_WHEELS": str(tmp_path / "none"),
        },
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for phase in (
        "generate: teacher backend, no capture (k=0)",
        "generate: teacher backend, top-64 capture",
        "train step: cross-entropy (baseline)",
        "train step: naive dense KD",
        "train step: sparse KD, chunked (trainer)",
        "vLLM comparison skipped: --no-vllm",
    ):
        assert phase in done.stdout, phase
