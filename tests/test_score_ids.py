"""``/v1/score`` with ``score_ids`` and the Arrow transport, against a real server.

The reference is an independent dense float64 log-softmax of the same tiny teacher's
logits, computed here with plain transformers.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM

from distillcache.shared.codec import decode_logprobs
from distillcache.shared.reader import ShardDataset
from distillcache.shared.schema import PARQUET_METADATA_KEY, DatasetInfo

ARROW = "application/vnd.apache.arrow.stream"
SERVER_SETTINGS = {"max_k": 16, "default_k": 4, "max_model_len": 256, "flush_rows": 1}

PROMPT = [5, 17, 42, 99, 7]
COMPLETION = [61, 8, 133, 250, 3, 77]


def _score_ids(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.choice(400, size=6, replace=False).tolist() for _ in range(n)]


def _reference(teacher_model, ids: list[int], start: int) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(teacher_model, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, start - 1 : len(ids) - 1, :400]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def test_score_ids_equal_a_dense_float64_log_softmax(client, teacher_model):
    score_ids = _score_ids(len(COMPLETION), 0)
    pair = {"prompt_ids": PROMPT, "completion_ids": COMPLETION, "score_ids": score_ids}
    r = client.post("/v1/score", json={"pairs": [pair], "k": 4})
    assert r.status_code == 200, r.text
    got = np.array(r.json()["results"][0]["score_logprobs"])
    ref = _reference(teacher_model, PROMPT + COMPLETION, len(PROMPT))
    want = np.take_along_axis(ref, np.array(score_ids), axis=1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_a_stored_answer_serves_score_ids_only_when_it_holds_exactly_those(client):
    completion = [9, 10, 11, 12]
    plain = {"prompt_ids": PROMPT, "completion_ids": completion}
    asked = {**plain, "score_ids": _score_ids(len(completion), 1)}
    other = {**plain, "score_ids": _score_ids(len(completion), 2)}

    def score(pair):
        r = client.post("/v1/score", json={"pairs": [pair]})
        assert r.status_code == 200, r.text
        return r.json()["results"][0]

    first, again, different, hit = score(asked), score(asked), score(other), score(plain)
    assert first["cached"] is False and again["cached"] is True
    assert again["score_logprobs"] == first["score_logprobs"], "a hit is as exact as asked"
    assert different["cached"] is False, "a row holding other ids cannot answer these"
    assert different["score_logprobs"] != first["score_logprobs"]
    assert hit["cached"] is True and hit["score_logprobs"] is None
    assert hit["topk_logprobs"] == first["topk_logprobs"] == different["topk_logprobs"]
    r = client.post("/v1/score", json={"pairs": [{**plain, "meta": {"_score_ids": 1}}]})
    assert r.status_code == 422 and "_score_ids" in r.text, r.text


def test_score_ids_of_the_wrong_shape_name_the_field(client):
    pair = {"prompt_ids": PROMPT, "completion_ids": [9, 10], "score_ids": [[1, 2]]}
    r = client.post("/v1/score", json={"pairs": [pair]})
    assert r.status_code == 422 and "pairs.0.score_ids" in r.text, r.text
    pair["score_ids"] = [[1, 1], [2]]
    r = client.post("/v1/score", json={"pairs": [pair]})
    assert r.status_code == 422 and "repeats" in r.text, r.text


def _arrow_table(response) -> tuple[pa.Table, DatasetInfo]:
    assert response.headers["content-type"].startswith(ARROW), response.headers
    table = pa.ipc.open_stream(response.content).read_all()
    info = DatasetInfo.model_validate_json(table.schema.metadata[PARQUET_METADATA_KEY])
    return table, info


def test_arrow_and_json_answers_decode_to_equal_numbers(client):
    pairs = [
        {
            "prompt_ids": PROMPT,
            "completion_ids": COMPLETION[:n],
            "score_ids": _score_ids(n, 2 + n),
        }
        for n in (2, 5)
    ]
    body = {"pairs": pairs, "k": 5, "cache": "bypass"}
    js = client.post("/v1/score", json=body).json()["results"]
    table, info = _arrow_table(client.post("/v1/score", json=body, headers={"Accept": ARROW}))
    assert table.num_rows == 2 and info.k == 5
    rows = table.to_pylist()
    for j, a in zip(js, rows, strict=True):
        assert a["completion_ids"] == j["completion_ids"] and a["key"] == j["key"]
        lps = decode_logprobs(np.array(a["topk_logprobs"]), info.logprob_codec)
        for ids_a, lp_a, ids_j, lp_j in zip(
            a["topk_ids"], lps, j["topk_ids"], j["topk_logprobs"], strict=True
        ):
            assert dict(zip(ids_a, lp_a.tolist(), strict=True)) == dict(
                zip(ids_j, lp_j, strict=True)
            )
        assert a["token_logprob"] == j["token_logprob"]
        assert a["tail_logprob"] == j["tail_logprob"]
        assert a["score_logprobs"] == j["score_logprobs"]
    generate = {"prompt_ids": PROMPT, "max_tokens": 4, "k": 3}
    jg = client.post("/v1/generate", json=generate).json()
    table, _ = _arrow_table(client.post("/v1/generate", json=generate, headers={"Accept": ARROW}))
    (ag,) = table.to_pylist()
    assert ag["cached"] is True and ag["completion_ids"] == jg["completion_ids"]
    assert ag["token_logprob"] == jg["token_logprob"] and ag["score_logprobs"] is None


def test_a_named_dataset_stores_every_answer_with_its_meta(client, server):
    pairs = [
        {"prompt_ids": PROMPT, "completion_ids": [20 + i], "meta": {"step": 3, "seed": i}}
        for i in range(2)
    ]
    r = client.post("/v1/score", json={"pairs": pairs, "dataset": "run-a"})
    assert r.status_code == 200, r.text
    assert {x["dataset"] for x in r.json()["results"]} == {"run-a"}
    r = client.post("/v1/score", json={"pairs": pairs, "dataset": "run-a"})
    assert all(x["cached"] for x in r.json()["results"])
    rows = {row.key: row for row in ShardDataset(server.data / "run-a").iter_records()}
    assert {(r.completion_ids[0], r.meta["seed"]) for r in rows.values()} == {(20, 0), (21, 1)}
