"""The teacher's HTTP API against a real server and a real transformers teacher."""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np
from service_support import metric, thread_server, wait_ready

from distillcache.services.teacher.runtime import open_backend
from distillcache.services.teacher.settings import TeacherSettings
from distillcache.shared.reader import ShardDataset

MAX_K = 16
CONTEXT = 256


SERVER_SETTINGS = {
    "max_k": MAX_K,
    "default_k": 8,
    "max_model_len": CONTEXT,
    "flush_rows": 1,
    "max_batch_size": 4,
    # Exact log-probs, so the tests can compare them tightly; codecs are shared/'s tests.
    "logprob_codec": "float32",
}


def test_generate_returns_topk_most_likely_first_with_token_and_tail_logprobs(client):
    r = client.post("/v1/generate", json={"prompt": "What is 2 + 2?", "max_tokens": 6, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    n = len(body["completion_ids"])
    assert n == 6 and body["finish_reason"] == "length"
    assert body["logprob_start"] == len(body["prompt_ids"])
    lps = np.array(body["topk_logprobs"])
    assert np.array(body["topk_ids"]).shape == lps.shape == (n, 5)
    assert (np.diff(lps, axis=1) <= 0).all(), "each position's top-k is most likely first"
    assert len(body["token_logprob"]) == len(body["tail_logprob"]) == n
    # Greedy decoding picks the top-1 token, so its log-prob is the top-1 log-prob.
    assert [ids[0] for ids in body["topk_ids"]] == body["completion_ids"]
    tail = np.array(body["tail_logprob"], dtype=float)
    kept = np.logaddexp.reduce(lps, axis=1)
    np.testing.assert_allclose(np.exp(kept) + np.exp(tail), 1.0, atol=1e-4)


def test_identical_request_is_answered_from_cache_without_running_the_teacher(client):
    request = {"messages": [{"role": "user", "content": "Name a fox."}], "max_tokens": 5}
    first = client.post("/v1/generate", json=request).json()
    teacher_before = metric(client, "distill_teacher_tokens_total")
    cache_before = metric(client, "distill_cache_tokens_total")
    second = client.post("/v1/generate", json=request).json()
    assert first["cached"] is False and second["cached"] is True
    assert {**second, "cached": False} == first
    assert metric(client, "distill_teacher_tokens_total") == teacher_before
    served = len(first["prompt_ids"]) + len(first["completion_ids"])
    assert metric(client, "distill_cache_tokens_total") == cache_before + served


def test_score_by_teacher_forcing_reproduces_the_generation_logprobs(client, chat_tokenizer):
    gen = client.post("/v1/generate", json={"prompt": "The quick brown", "max_tokens": 4}).json()
    r = client.post(
        "/v1/score",
        json={
            "pairs": [
                {"prompt_ids": gen["prompt_ids"], "completion_ids": gen["completion_ids"]},
                {"prompt": "The quick brown", "completion": "fox"},
            ]
        },
    )
    assert r.status_code == 200, r.text
    forced, text = r.json()["results"]
    assert forced["cached"] is False and forced["key"] != gen["key"]
    np.testing.assert_allclose(forced["token_logprob"], gen["token_logprob"], atol=1e-4)
    np.testing.assert_allclose(forced["topk_logprobs"], gen["topk_logprobs"], atol=1e-4)
    np.testing.assert_allclose(forced["tail_logprob"], gen["tail_logprob"], atol=1e-3)
    # A text completion is scored up to and including the eos that closes it.
    assert text["completion_ids"][-1] == chat_tokenizer.eos_token_id
    assert text["prompt_ids"] == gen["prompt_ids"]
    assert len(text["token_logprob"]) == len(text["completion_ids"])


def test_stored_answers_land_in_a_live_dataset_of_their_k(client, server):
    body = client.post("/v1/generate", json={"prompt": "Store me", "max_tokens": 3, "k": 3}).json()
    ds = ShardDataset(server.data / body["dataset"])
    assert ds.info.k == 3
    rows = {row.key: row for row in ds.iter_records()}
    assert rows[body["key"]].completion_ids.tolist() == body["completion_ids"]
    assert rows[body["key"]].request["mode"] == "generate"


def test_cache_modes_read_and_bypass_store_nothing_and_bypass_always_runs_the_teacher(client):
    read = {"prompt": "Do not keep this", "max_tokens": 3, "cache": "read"}
    first = client.post("/v1/generate", json=read).json()
    second = client.post("/v1/generate", json=read).json()
    assert first["dataset"] is None and first["cached"] is False
    assert second["cached"] is False, "a read-only request stored its answer"

    stored = client.post("/v1/generate", json={**read, "cache": "read-write"}).json()
    assert stored["dataset"] is not None and stored["cached"] is False
    assert client.post("/v1/generate", json=read).json()["cached"] is True

    teacher_runs = metric(client, "distill_teacher_sequences_total")
    bypass = client.post("/v1/generate", json={**read, "cache": "bypass"}).json()
    assert bypass["cached"] is False and bypass["dataset"] is None
    assert metric(client, "distill_teacher_sequences_total") == teacher_runs + 1
    assert bypass["completion_ids"] == stored["completion_ids"]  # greedy: the same answer


def test_unknown_field_gets_422_naming_the_field(client):
    r = client.post("/v1/generate", json={"prompt": "hi", "temprature": 0.5})
    assert r.status_code == 422
    assert "temprature" in r.json()["message"]


def test_k_above_the_maximum_gets_422_naming_k(client):
    r = client.post("/v1/generate", json={"prompt": "hi", "k": MAX_K + 1})
    assert r.status_code == 422
    assert r.json()["message"].startswith("k:")
    r = client.post(
        "/v1/score", json={"pairs": [{"prompt": "hi", "completion": "yo"}], "k": MAX_K + 1}
    )
    assert r.status_code == 422 and r.json()["message"].startswith("k:")


def test_prompt_longer_than_the_context_gets_422_naming_the_prompt(client):
    r = client.post("/v1/generate", json={"prompt_ids": [5] * (CONTEXT + 1)})
    assert r.status_code == 422
    assert r.json()["message"].startswith("prompt_ids:")
    r = client.post("/v1/generate", json={"prompt": "hi", "max_tokens": CONTEXT})
    assert r.status_code == 422 and r.json()["message"].startswith("max_tokens:")
    r = client.post(
        "/v1/score",
        json={"pairs": [{"prompt": "hi", "completion_ids": [5] * CONTEXT}]},
    )
    assert r.status_code == 422 and r.json()["message"].startswith("pairs.0.completion_ids:")


def test_prompt_fields_are_checked_by_name(client):
    r = client.post("/v1/generate", json={"prompt": "a", "prompt_ids": [1]})
    assert r.status_code == 422 and "exactly one of prompt, messages, prompt_ids" in r.text
    r = client.post("/v1/generate", json={"prompt_ids": [10**9]})
    assert r.status_code == 422 and r.json()["message"].startswith("prompt_ids:")
    r = client.post("/v1/generate", json={"messages": [{"role": "assistant", "content": "x"}]})
    assert r.status_code == 422 and r.json()["message"].startswith("messages:")


def test_probes_metrics_and_openapi_are_served(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["max_k"] == MAX_K
    text = client.get("/metrics").text
    for name in (
        "distill_teacher_tokens_total",
        "distill_cache_tokens_total",
        "distill_queue_depth",
        "distill_requests_total",
    ):
        assert name in text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/generate", "/v1/score", "/v1/jobs", "/v1/datasets"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_datasets_are_listed_with_their_manifest_summaries(client):
    client.post("/v1/generate", json={"prompt": "List me", "max_tokens": 2, "k": 2})
    listing = client.get("/v1/datasets").json()
    by_name = {d["name"]: d for d in listing}
    live = next(d for d in listing if d["info"]["k"] == 2)
    assert live["rows"] >= 1 and live["shards"] >= 1 and live["bytes"] > 0
    assert client.get(f"/v1/datasets/{live['name']}").json() == by_name[live["name"]]
    assert client.get("/v1/datasets/nope").status_code == 404


def test_v1_answers_503_until_the_teacher_has_loaded(tmp_path, teacher_model):
    model = teacher_model
    settings = TeacherSettings(model=str(model), data_root=tmp_path / "data")
    release = threading.Event()

    async def load_when_released():
        await asyncio.to_thread(release.wait)
        return await open_backend(settings)

    with thread_server(settings, load_when_released) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/readyz").json() == {"status": "loading"}
        early = httpx.post(f"{url}/v1/generate", json={"prompt": "hi", "max_tokens": 1})
        assert early.status_code == 503 and int(early.headers["Retry-After"]) >= 1
        release.set()
        wait_ready(url)
        late = httpx.post(f"{url}/v1/generate", json={"prompt": "hi", "max_tokens": 1})
        assert late.status_code == 200, late.text
