"""TRL's real ``VLLMClient`` against distillcache, as TRL's distillation trainers use it.

TRL (1.16) talks to a teacher through vLLM's own server: ``/health``, ``/v1/models`` and
``/v1/completions`` (``get_sequence_logprobs``: whole sequences, ``prompt_logprobs``,
``max_tokens`` 1, a temperature; ``generate``: token ids back). This server runs with
``logprobs_mode: processed_logprobs``, as TRL's docs start vLLM, so a temperature is
applied; the reference for it is a dense float64 log-softmax of the teacher's logits.
``VLLMClient`` sends no bearer token, so auth is off here (its 401 is tested with auth on
in test_dropin_openai.py and below with a second server). The older ``trl vllm-serve``
endpoints, which the installed TRL no longer calls, are checked by replaying its
client's request bodies.
"""

from __future__ import annotations

import base64
import math

import httpx
import numpy as np
import pytest
import torch
from service_support import metric, thread_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillcache.services.teacher.settings import TeacherSettings

vllm_client = pytest.importorskip("trl.generation.vllm_client")

DATASET = "trl-teacher"
SERVER_SETTINGS = {
    "logprob_codec": "float32",
    "max_k": 8,
    "default_k": 8,
    "logprobs_mode": "processed_logprobs",
    "dropin_dataset": DATASET,
}
ATOL = 1e-5
TEXTS = ["What is 17 + 25? The answer is 42.", "Tom has 3 apples and buys 4 more."]


@pytest.fixture(scope="module")
def tokenizer(teacher_model):
    return AutoTokenizer.from_pretrained(teacher_model)


@pytest.fixture(scope="module")
def sequences(tokenizer) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module")
def trl_client(server):
    return vllm_client.VLLMClient(base_url=server.url, connection_timeout=30)


def dense_logprobs(teacher_model, tokenizer, seq: list[int], temperature: float) -> np.ndarray:
    """float64 log_softmax(logits / T) over the tokenizer's vocabulary, per next token."""
    model = AutoModelForCausalLM.from_pretrained(teacher_model, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, :, : len(tokenizer)].double()
    return torch.log_softmax(logits / temperature, dim=-1).numpy()


def score(client: httpx.Client, seq: list[int], k: int) -> dict:
    r = client.post(
        "/v1/score",
        json={
            "pairs": [{"prompt_ids": seq[:1], "completion_ids": seq[1:]}],
            "k": k,
            "cache": "bypass",
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def test_get_sequence_logprobs_equals_score_and_repeats_from_cache(trl_client, client, sequences):
    k, prompt_lengths = 4, [5, 3]
    got = trl_client.get_sequence_logprobs(sequences, prompt_lengths, top_logprobs=k)
    for b, (seq, p) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        ref = score(client, seq, k)
        # Position i of the sequence is score position i - 1 (scoring starts at token 1).
        assert got["logprob_token_ids"][b] == ref["topk_ids"][p - 1 :]
        np.testing.assert_allclose(got["logprobs"][b], ref["topk_logprobs"][p - 1 :], atol=ATOL)
        np.testing.assert_allclose(
            [a[0] for a in got["actual_logprobs"][b]], ref["token_logprob"][p - 1 :], atol=ATOL
        )
        assert got["actual_token_ids"][b] == [[t] for t in seq[p:]]

    runs = metric(client, "distill_teacher_sequences_total")
    assert trl_client.get_sequence_logprobs(sequences, prompt_lengths, top_logprobs=k) == got
    assert metric(client, "distill_teacher_sequences_total") == runs


def test_temperature_is_applied_as_documented(trl_client, sequences, teacher_model, tokenizer):
    """At T != 1: each position's top-k is the true tempered top-k, renormalised over those
    k, so it is above vLLM's full-vocabulary value by exactly -log(tempered top-k mass)."""
    k, t, seq = 4, 2.0, sequences[0]
    got = trl_client.get_sequence_logprobs([seq], [1], top_logprobs=k, temperature=t)
    dense = dense_logprobs(teacher_model, tokenizer, seq, t)
    for j, (ids, values) in enumerate(
        zip(got["logprob_token_ids"][0], got["logprobs"][0], strict=True)
    ):
        exact = dense[j]  # the distribution over token j + 1
        assert set(ids) == set(np.argsort(-exact)[:k].tolist())
        topk_mass = np.logaddexp.reduce(exact[ids])
        assert topk_mass < 0
        np.testing.assert_allclose(values, exact[ids] - topk_mass, atol=1e-5)
        np.testing.assert_allclose(
            got["actual_logprobs"][0][j][0], exact[seq[j + 1]] - topk_mass, atol=1e-5
        )


def test_generate_returns_what_trl_reads(trl_client, client, sequences):
    out = trl_client.generate([sequences[1]], max_tokens=4, temperature=0.0, logprobs=2)
    assert out["prompt_ids"] == [sequences[1]]
    (completion,) = out["completion_ids"]
    assert 1 <= len(completion) <= 4
    ref = client.post(
        "/v1/score",
        json={
            "pairs": [{"prompt_ids": sequences[1], "completion_ids": completion}],
            "k": 2,
            "cache": "bypass",
        },
    ).json()["results"][0]
    for j, token in enumerate(completion):
        # Greedy: the sampled token is the top one, so TRL's merged list is the top 2.
        assert out["logprob_token_ids"][0][j] == ref["topk_ids"][j]
        assert out["logprob_token_ids"][0][j][0] == token
        np.testing.assert_allclose(out["logprobs"][0][j], ref["topk_logprobs"][j], atol=1e-4)
    runs = metric(client, "distill_teacher_sequences_total")
    assert trl_client.generate([sequences[1]], max_tokens=4, temperature=0.0, logprobs=2) == out
    assert metric(client, "distill_teacher_sequences_total") == runs


def test_answers_land_in_the_named_dataset(trl_client, client, sequences, server):
    trl_client.get_sequence_logprobs(sequences, [2, 2], top_logprobs=3)
    names = {d["name"]: d for d in client.get("/v1/datasets").json()}
    scored = names[f"{DATASET}-k3"]
    assert scored["rows"] + scored["pending_rows"] == len(sequences)
    # max_tokens 1 also draws one token per sequence, stored with its k (1).
    drawn = names[f"{DATASET}-k1"]
    assert drawn["rows"] + drawn["pending_rows"] >= len(sequences)


def test_weight_sync_answers_501(trl_client):
    with pytest.raises(Exception, match="501.*fixed teacher"):
        trl_client.get_world_size()
    with pytest.raises(Exception, match="501"):
        trl_client.get_server_info()


def test_with_auth_on_the_client_is_refused(teacher_model, tmp_path):
    settings = TeacherSettings(model=str(teacher_model), data_root=tmp_path, auth_token="tok")
    with thread_server(settings) as url:
        with pytest.raises(Exception, match="401"):
            vllm_client.VLLMClient(base_url=url, connection_timeout=5)


def test_nan_free_answers(trl_client, sequences):
    got = trl_client.get_sequence_logprobs(sequences, [1, 1], top_logprobs=8)
    assert all(math.isfinite(v) for row in got["logprobs"] for pos in row for v in pos)


# The older `trl vllm-serve` server's endpoints: the bodies its client sent, field for field
# (that client is not in the installed TRL, which talks to /v1/completions instead).


def old_sequence_logprobs(client, sequences, prompt_lengths, k, response_format):
    body = {
        "sequences": sequences,
        "prompt_lengths": prompt_lengths,
        "top_logprobs": k,
        "temperature": 1.0,
        "response_format": response_format,
    }
    r = client.post("/get_sequence_logprobs/", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_old_get_sequence_logprobs_json_and_binary_equal_score(client, sequences):
    k, prompt_lengths = 4, [5, 0]
    as_json = old_sequence_logprobs(client, sequences, prompt_lengths, k, "json")
    runs = metric(client, "distill_teacher_sequences_total")
    binary = old_sequence_logprobs(client, sequences, prompt_lengths, k, "binary")
    assert metric(client, "distill_teacher_sequences_total") == runs
    shape = binary["shape"]
    assert binary["completion_lengths"] == [
        len(s) - p for s, p in zip(sequences, prompt_lengths, strict=True)
    ]
    assert shape == [2, max(binary["completion_lengths"]), k]

    def array(name, dtype, width):
        flat = np.frombuffer(base64.b64decode(binary[name]), dtype=dtype)
        return flat.reshape(shape[0], shape[1], width)

    top = array("logprobs_b64", np.float32, k)
    top_ids = array("token_ids_b64", np.int32, k)
    actual = array("actual_logprobs_b64", np.float32, 1)
    actual_ids = array("actual_token_ids_b64", np.int32, 1)
    for b, (seq, p) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        ref = score(client, seq, k)
        rows, ids = as_json["logprobs"][b], as_json["logprob_token_ids"][b]
        assert len(rows) == len(seq) - p
        if p == 0:  # position 0 has no distribution: empty there, padding in binary
            assert rows[0] == [] and ids[0] == [] and np.all(np.isneginf(top[b, 0]))
        first = max(p, 1)
        for j in range(first, len(seq)):
            t, s = j - p, j - 1
            assert ids[t][:k] == ref["topk_ids"][s] == top_ids[b, t].tolist()
            np.testing.assert_allclose(rows[t][:k], ref["topk_logprobs"][s], atol=ATOL)
            np.testing.assert_allclose(top[b, t], ref["topk_logprobs"][s], atol=ATOL)
            assert actual_ids[b, t, 0] == seq[j]
            np.testing.assert_allclose(actual[b, t, 0], ref["token_logprob"][s], atol=ATOL)
            if seq[j] not in ref["topk_ids"][s]:  # vLLM adds the actual token, ranked last
                assert ids[t][k] == seq[j] and len(ids[t]) == k + 1


def test_old_generate_equals_the_new_clients(client, trl_client, sequences):
    body = {
        "prompts": [sequences[0]],
        "n": 1,
        "repetition_penalty": 1.0,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "max_tokens": 4,
        "logprobs": 2,
        "structured_outputs_regex": None,
        "generation_kwargs": {},
    }
    r = client.post("/generate/", json=body)
    assert r.status_code == 200, r.text
    new = trl_client.generate([sequences[0]], max_tokens=4, temperature=0.0, logprobs=2)
    assert r.json() == new
    runs = metric(client, "distill_teacher_sequences_total")
    assert client.post("/generate/", json=body).json() == new
    assert metric(client, "distill_teacher_sequences_total") == runs
    refused = client.post("/generate/", json={**body, "n": 2, "min_p": 0.1})
    assert refused.status_code == 422 and "n, min_p" in refused.json()["message"]


def test_old_server_probe(server):
    assert httpx.get(server.url + "/health/").json() == {"status": "ok"}
