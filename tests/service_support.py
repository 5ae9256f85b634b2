"""Helpers for the teacher service tests: a tiny local teacher, real servers, job polling.

Servers are real: uvicorn on a free port, in a thread of the test process (quick, one
backend load) or as a `distill serve` subprocess (when a test must SIGKILL it).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from distillcache.services.teacher.app import create_app
from distillcache.services.teacher.readiness import free_port, wait_ready
from distillcache.services.teacher.runtime import open_backend
from distillcache.services.teacher.server import server_config
from distillcache.services.teacher.settings import TeacherSettings
from distillcache.shared.tiny_models import build_tiny_model

DISTILL = str(Path(sys.executable).parent / "distill")


def build_teacher(out_dir: Path, tokenizer_dir: Path, max_position_embeddings: int = 512) -> Path:
    """A 2-layer, 128-wide Qwen2 with head size 64 (vLLM's CPU attention accepts it)."""
    return build_tiny_model(
        out_dir,
        tokenizer_dir,
        hidden_size=128,
        num_heads=2,
        num_layers=2,
        intermediate_size=256,
        max_position_embeddings=max_position_embeddings,
        seed=0,
    )


@contextmanager
def thread_server(
    settings: TeacherSettings, load_backend: Callable[[], Awaitable[Any]] | None = None
) -> Iterator[str]:
    """The app for ``settings`` under uvicorn in a thread; yields its base URL once it
    answers (ready, unless ``load_backend`` replaces the settings' backend loading)."""
    settings = settings.model_copy(update={"port": free_port(), "host": "127.0.0.1"})
    app = create_app(settings, load_backend or (lambda: open_backend(settings)))
    server = uvicorn.Server(server_config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{settings.host}:{settings.port}"
    try:
        if load_backend is None:
            wait_ready(url)
        else:
            deadline = time.monotonic() + 60
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the test server on {url} did not start")
                time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@contextmanager
def serve_process(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`distill serve ARGS --port <free>` as a subprocess; yields (URL, process)."""
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [DISTILL, "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process=process)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One JSON value per line; a str is written as it is (a malformed line)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def question_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"q{i}", "question": f"What is {i} + {i % 7}?"} for i in range(start, start + n)]


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still running after {timeout} s")


def metric(client: httpx.Client, name: str) -> float:
    """A counter's value from /metrics (0 when it has no sample yet)."""
    return metric_value(client.get("/metrics").text, name)


def metric_value(exposition: str, name: str) -> float:
    """A sample's value in Prometheus text (0 when it has none yet)."""
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def fill_disk(disk: Path, leave: int) -> Path:
    """Fill the file system of ``disk`` up (to ENOSPC), then free ``leave`` bytes of it
    again; returns the filler file, whose removal frees the rest."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    os.truncate(filler, max(filler.stat().st_size - leave, 0))
    return filler
