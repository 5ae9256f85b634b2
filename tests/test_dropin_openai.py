"""vLLM's ``/v1/completions`` through the real ``openai`` client, and axolotl's request.

Auth is on here: the ``openai`` client sends its ``api_key`` as the bearer token. Every
value is checked against ``/v1/score`` of the same sequence with ``cache: bypass`` (a
fresh teacher run), with the float32 codec, so the only difference allowed is the
teacher's own batch-to-batch float noise; a repeated call must run the teacher 0 times.
"""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
from service_support import metric
from transformers import AutoTokenizer

TOKEN = "dropin-token"
SERVER_SETTINGS = {"auth_token": TOKEN, "logprob_codec": "float32", "max_k": 8, "default_k": 8}
# Float noise between a batched and a lone forward pass of the float32 tiny teacher.
ATOL = 1e-5

TEXTS = ["What is 17 + 25? The answer is 42.", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def tokenizer(teacher_model):
    return AutoTokenizer.from_pretrained(teacher_model)


@pytest.fixture(scope="module")
def sequences(tokenizer) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in TEXTS]


@pytest.fixture
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0)


def score(client: httpx.Client, seq: list[int], k: int, completion_from: int = 1) -> dict:
    """/v1/score of ``seq`` split at ``completion_from``, fresh from the teacher."""
    r = client.post(
        "/v1/score",
        json={
            "pairs": [
                {"prompt_ids": seq[:completion_from], "completion_ids": seq[completion_from:]}
            ],
            "k": k,
            "cache": "bypass",
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def test_models_lists_the_teacher(oai, server):
    (model,) = oai.models.list().data
    assert model.id == server.settings.model


def test_echo_prompt_logprobs_equal_score_and_repeat_from_cache(oai, client, sequences):
    k = 5
    model = oai.models.list().data[0].id

    def ask():
        return oai.completions.create(
            model=model,
            prompt=sequences,
            max_tokens=0,
            echo=True,
            temperature=1.0,
            extra_body={"prompt_logprobs": k, "skip_special_tokens": False},
        )

    response = ask()
    assert len(response.choices) == len(sequences)
    for choice, seq in zip(response.choices, sequences, strict=True):
        prompt_logprobs = choice.model_extra["prompt_logprobs"]
        assert len(prompt_logprobs) == len(seq) and prompt_logprobs[0] is None
        ref = score(client, seq, k)
        for j, position in enumerate(prompt_logprobs[1:]):
            actual = str(seq[j + 1])
            assert next(iter(position)) == actual, "vLLM lists the actual token first"
            by_rank = sorted(
                (e["rank"], int(t), e["logprob"]) for t, e in position.items() if e["rank"] <= k
            )
            assert [r for r, _, _ in by_rank] == list(range(1, k + 1))
            assert [t for _, t, _ in by_rank] == ref["topk_ids"][j]
            np.testing.assert_allclose(
                [v for _, _, v in by_rank], ref["topk_logprobs"][j], rtol=0, atol=ATOL
            )
            np.testing.assert_allclose(
                position[actual]["logprob"], ref["token_logprob"][j], rtol=0, atol=ATOL
            )
            assert all(isinstance(e["decoded_token"], str) for e in position.values())
        assert choice.text.startswith(TEXTS[sequences.index(seq)][:5])

    runs = metric(client, "distill_teacher_sequences_total")
    again = ask()
    assert metric(client, "distill_teacher_sequences_total") == runs
    assert [c.model_extra["prompt_logprobs"] for c in again.choices] == [
        c.model_extra["prompt_logprobs"] for c in response.choices
    ]


def test_plain_generation_with_logprobs_equals_score(oai, client, tokenizer):
    model = oai.models.list().data[0].id
    text = "Tom has 3 apples and buys 4 more."

    def ask():
        return oai.completions.create(
            model=model,
            prompt=text,
            max_tokens=5,
            temperature=0,
            logprobs=3,
            extra_body={"return_token_ids": True},
        )

    response = ask()
    (choice,) = response.choices
    prompt_ids = tokenizer(text)["input_ids"]
    completion = choice.model_extra["token_ids"]
    assert choice.model_extra["prompt_token_ids"] == prompt_ids
    assert 1 <= len(completion) <= 5 and response.usage.completion_tokens == len(completion)
    assert choice.text == tokenizer.decode(completion, skip_special_tokens=True)
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in completion]
    ref = score(client, prompt_ids + completion, 3, completion_from=len(prompt_ids))
    # Generation computes log-probs step by step, scoring in one pass: the backends'
    # agreement bound (docs/teacher-service.md).
    np.testing.assert_allclose(lp.token_logprobs, ref["token_logprob"], rtol=0, atol=1e-4)
    for top, ids, values in zip(
        lp.top_logprobs, ref["topk_ids"], ref["topk_logprobs"], strict=True
    ):
        expected = {tokenizer.decode([t]): v for t, v in zip(ids, values, strict=True)}
        for name, value in expected.items():
            np.testing.assert_allclose(top[name], value, rtol=0, atol=1e-4)
    # Greedy: every generated token is the teacher's most likely one.
    assert completion[: len(ref["topk_ids"])] == [ids[0] for ids in ref["topk_ids"]]

    runs = metric(client, "distill_teacher_sequences_total")
    assert ask().choices[0].model_extra["token_ids"] == completion
    assert metric(client, "distill_teacher_sequences_total") == runs


def test_axolotl_collator_request_replayed(client, sequences):
    """The body axolotl's OnlineTeacherCollator.fetch_online_logprobs_vllm sends, field for
    field (axolotl is not a test dependency: it pins its own torch)."""
    k = 4
    body = {
        "prompt": sequences,
        "echo": True,
        "logprobs": True,
        "prompt_logprobs": k,
        "top_logprobs": k,
        "max_new_tokens": 0,
        "skip_special_tokens": False,
        "temperature": 1.0,
        "sampling_params": {"max_tokens": 0},
    }
    r = client.post("/v1/completions", json=body, headers={"Accept-Encoding": "gzip, zstd"})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == len(sequences)
    for choice, seq in zip(choices, sequences, strict=True):
        prompt_logprobs = choice["prompt_logprobs"]
        # The collator asserts this length, then reads positions 1.. as dicts by token id.
        assert len(prompt_logprobs) == len(seq) and prompt_logprobs[0] is None
        ref = score(client, seq, k)
        for j, position in enumerate(prompt_logprobs[1:]):
            top = sorted(position.items(), key=lambda item: item[1]["rank"])[:k]
            assert [int(t) for t, _ in top] == ref["topk_ids"][j]
            np.testing.assert_allclose(
                [e["logprob"] for _, e in top], ref["topk_logprobs"][j], rtol=0, atol=ATOL
            )
    runs = metric(client, "distill_teacher_sequences_total")
    assert (
        client.post("/v1/completions", json=body).json()["choices"][0]["prompt_logprobs"]
        == (choices[0]["prompt_logprobs"])
    )
    assert metric(client, "distill_teacher_sequences_total") == runs


def test_without_the_token_every_client_gets_401(server, sequences):
    anonymous = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.completions.create(model="m", prompt=sequences[0], max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    for path in ("/v1/completions", "/init_communicator/", "/update_weights"):
        assert httpx.post(server.url + path, json={}).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200


def test_unserved_fields_are_refused_by_name(client, sequences):
    r = client.post("/v1/completions", json={"prompt": sequences[0], "n": 2})
    assert r.status_code == 422 and "n" in r.json()["message"]
    r = client.post("/v1/completions", json={"prompt": [sequences[0]], "prompt_logprobs": 99})
    assert r.status_code == 422 and r.json()["message"].startswith("prompt_logprobs:")
    r = client.post("/v1/completions", json={"prompt": [[1, 10**6]], "max_tokens": 1})
    assert r.status_code == 422 and r.json()["message"].startswith("prompt:")
    # Nothing asked of the teacher, but the prompt is still echoed: its ids are checked too
    # (the fuzz test found a 500).
    r = client.post("/v1/completions", json={"prompt": [-1], "max_tokens": 0})
    assert r.status_code == 422 and r.json()["message"].startswith("prompt: token id -1")
    r = client.post("/v1/completions", json={"model": "other", "prompt": "hi"})
    assert r.status_code == 404 and "other" in r.text


def test_axolotl_sglang_request_replayed(client, sequences, tokenizer):
    """The body axolotl's OnlineTeacherCollator.fetch_online_logprobs_sglang sends, field
    for field; SGLang answers one object per sequence, top-k as [logprob, id, text]."""
    k = 3
    body = {
        "input_ids": sequences,
        "return_logprob": True,
        "top_logprobs_num": k,
        "logprob_start_len": 0,
        "return_text_in_logprobs": True,
        "echo": True,
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0, "skip_special_tokens": False},
    }
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    answers = r.json()
    assert isinstance(answers, list) and len(answers) == len(sequences)
    for answer, seq in zip(answers, sequences, strict=True):
        tops = answer["meta_info"]["input_top_logprobs"]
        # The collator asserts this length and reads [logprob, token_id, text] triples.
        assert len(tops) == len(seq) and tops[0] is None
        ref = score(client, seq, k)
        for j, position in enumerate(tops[1:]):
            assert [e[1] for e in position] == ref["topk_ids"][j]
            np.testing.assert_allclose(
                [e[0] for e in position], ref["topk_logprobs"][j], rtol=0, atol=ATOL
            )
            assert [e[2] for e in position] == [tokenizer.decode([t]) for t in ref["topk_ids"][j]]
        actual = answer["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in actual] == seq
        np.testing.assert_allclose([e[0] for e in actual[1:]], ref["token_logprob"], atol=ATOL)
    runs = metric(client, "distill_teacher_sequences_total")
    assert client.post("/generate", json=body).json() == answers
    assert metric(client, "distill_teacher_sequences_total") == runs
    generation = {**body, "sampling_params": {"max_new_tokens": 4}}
    r = client.post("/generate", json=generation)
    assert r.status_code == 422 and "max_new_tokens" in r.json()["message"]
    assert httpx.post(client.base_url.join("/generate"), json=body).status_code == 401


def test_echo_with_logprobs_lists_prompt_then_completion(oai, client, sequences):
    model = oai.models.list().data[0].id
    seq = sequences[1]
    response = oai.completions.create(
        model=model,
        prompt=seq,
        max_tokens=2,
        temperature=0,
        echo=True,
        logprobs=2,
        extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True},
    )
    (choice,) = response.choices
    completion = choice.model_extra["token_ids"]
    lp = choice.logprobs
    assert lp.tokens == [f"token_id:{t}" for t in seq + completion]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    ref = score(client, seq + completion, 2)
    np.testing.assert_allclose(lp.token_logprobs[1:], ref["token_logprob"], rtol=0, atol=1e-4)
    for top, ids in zip(lp.top_logprobs[1:], ref["topk_ids"], strict=True):
        assert {f"token_id:{t}" for t in ids} <= set(top) and len(top) <= 3
