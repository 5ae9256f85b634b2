"""The two teacher backends on one tiny local model: exact, consistent, and in agreement.

The transformers backend is the reference (plain float32 forward passes). The vLLM
backend must give the same completions, the same top-k ids and the same log-probs
within 1e-4 on the same float32 model. The model pads its logit width (512) past its
tokenizer (~400 tokens), with trained-but-never-targeted padding rows that hold real
probability mass, so a backend that forgot to slice would be caught.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillcache.services.teacher.backend import Query, TeacherOutput
from distillcache.services.teacher.backend_transformers import TransformersBackend
from distillcache.services.teacher.limits import QueryError
from distillcache.shared.schema import Sampling
from distillcache.shared.tiny_models import (
    build_tiny_model,
    chat_texts,
    synthetic_task_rows,
    train_tiny_model,
)

TOLERANCE = 1e-4
PADDED_WIDTH = 512
MAX_MODEL_LEN = 512
QUESTIONS = (
    "What is 12 + 7?",
    "There are 5 boxes with 3 pens in each. How many pens are there?",
    "Hi",
    "A shelf holds 40 books and 9 are taken away. How many books are left?",
)

Run = Callable[[Coroutine[Any, Any, Any]], Any]
VLLM = pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on `n` intra-op threads, then restore the count.

    On a shared two-core machine, two OpenMP threads wait for each other whenever another
    process holds a core: the teacher's 100 training steps took 3 s on one thread and
    107 s on two under a load of 4.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer Qwen2 (2 query heads sharing 1 KV head) trained just enough to answer and
    stop, with a padded logit width.

    The padding rows of its (tied) output embedding are copies of `<|im_end|>`'s, so
    they carry as much mass as eos does: any backend that normalizes over the padded
    width gets visibly different log-probs, and samples or picks padding ids.
    """
    out_dir = build_tiny_model(
        tmp_path_factory.mktemp("teacher"),
        tokenizer_dir,
        padded_vocab=PADDED_WIDTH,
        max_position_embeddings=MAX_MODEL_LEN,
        num_kv_heads=1,
    )
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    with torch_threads(1):
        train_tiny_model(
            out_dir,
            chat_texts(synthetic_task_rows(64), tokenizer),
            steps=100,
            batch_size=8,
            lr=5e-3,
        )
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight[len(tokenizer) :] = weight[tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def prompts(teacher_dir: Path) -> list[tuple[int, ...]]:
    """Chat prompts of different lengths, so batches are padded."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    return [
        tuple(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True
            )["input_ids"]
        )
        for q in QUESTIONS
    ]


@pytest.fixture(scope="session")
def reference_model(teacher_dir: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def transformers_backend(teacher_dir: Path) -> tuple[TransformersBackend, Run]:
    return TransformersBackend(teacher_dir, max_model_len=MAX_MODEL_LEN), asyncio.run


@pytest.fixture(scope="session")
def vllm_backend(teacher_dir: Path) -> Iterator[tuple[Any, Run]]:
    """One engine for the session, driven from one event loop in a thread.

    AsyncLLM binds its output handler to the loop of its first request, so every test
    submits its coroutines to that same loop.
    """
    pytest.importorskip("vllm")
    from distillcache.services.teacher.backend_vllm import VllmBackend

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=300)

    backend = VllmBackend(
        teacher_dir, dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN
    )
    yield backend, run
    run(backend.close())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)
    loop.close()


@pytest.fixture(params=["transformers", VLLM])
def backend(request: pytest.FixtureRequest) -> tuple[Any, Run]:
    return request.getfixturevalue(f"{request.param}_backend")


def greedy(prompts: list[tuple[int, ...]], k: int = 20, max_tokens: int = 24) -> list:
    return [Query("generate", p, k=k, sampling=Sampling(max_tokens=max_tokens)) for p in prompts]


def full_logprobs(model, sequence: list[int], width: int) -> torch.Tensor:
    """Exact float32 log-softmax over the first `width` logit columns, at every position."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([sequence])).logits[0]
    return torch.log_softmax(logits[:, :width].float(), dim=-1)


def assert_same_topk(a_ids, a_logprobs, b_ids, b_logprobs) -> None:
    """The same top-k at every position, up to the order of log-probs tied within TOLERANCE.

    Log-probs agree within TOLERANCE as sorted lists; an id may be missing from the
    other side only where it ties (within TOLERANCE) with that side's k-th log-prob.
    """
    np.testing.assert_allclose(
        -np.sort(-a_logprobs, axis=1), -np.sort(-b_logprobs, axis=1), rtol=0, atol=TOLERANCE
    )
    for position, (ai, al, bi, bl) in enumerate(
        zip(a_ids, a_logprobs, b_ids, b_logprobs, strict=True)
    ):
        theirs = dict(zip(bi.tolist(), bl.tolist(), strict=True))
        for token, logprob in zip(ai.tolist(), al.tolist(), strict=True):
            if token in theirs:
                assert abs(theirs[token] - logprob) <= TOLERANCE, (position, token)
            else:
                assert logprob <= bl.min() + TOLERANCE, (position, token)


def assert_same_teacher_output(a: TeacherOutput, b: TeacherOutput) -> None:
    """Same tokens and text, the same top-k, log-probs within TOLERANCE."""
    assert a.completion_ids == b.completion_ids
    assert a.completion_text == b.completion_text
    assert a.finish_reason == b.finish_reason
    assert a.logprob_start == b.logprob_start
    assert a.topk_ids.shape == b.topk_ids.shape
    assert_same_topk(a.topk_ids, a.topk_logprobs, b.topk_ids, b.topk_logprobs)
    np.testing.assert_allclose(a.token_logprob, b.token_logprob, rtol=0, atol=TOLERANCE)


@pytest.mark.vllm
@pytest.mark.slow
def test_backends_agree_on_greedy_topk(transformers_backend, vllm_backend, prompts):
    (reference, run_reference), (engine, run_engine) = transformers_backend, vllm_backend
    requests = greedy(prompts, k=20)
    expected = run_reference(reference.generate(requests))
    got = run_engine(engine.generate(requests))
    for a, b in zip(expected, got, strict=True):
        assert len(a.completion_ids) > 3
        assert a.topk_ids.shape == (len(a.completion_ids), 20)
        assert_same_teacher_output(a, b)


@pytest.mark.vllm
@pytest.mark.slow
def test_backends_agree_on_scoring_from_logprob_start(transformers_backend, vllm_backend, prompts):
    (reference, run_reference), (engine, run_engine) = transformers_backend, vllm_backend
    completion = tuple(reference.tokenizer("The answer is 19.")["input_ids"])
    requests = [
        Query("score", prompts[0], k=64, completion_ids=completion),
        Query("score", prompts[1], k=5, completion_ids=completion, logprob_start=3),
        Query("score", prompts[2], k=1, completion_ids=completion[:1]),
    ]
    expected = run_reference(reference.score(requests))
    got = run_engine(engine.score(requests))
    for request, a, b in zip(requests, expected, got, strict=True):
        start = request.logprob_start or len(request.prompt_ids)
        n = len(request.prompt_ids) + len(request.completion_ids) - start
        assert a.topk_ids.shape == (n, request.k)
        assert_same_teacher_output(a, b)


def test_token_logprob_is_the_full_vocab_log_softmax_even_outside_topk(
    backend, prompts, reference_model
):
    teacher, run = backend
    # Tokens the teacher finds unlikely, so most lie outside a top-2.
    completion = tuple(teacher.tokenizer("zebra quantum 7 fox")["input_ids"])
    (out,) = run(
        teacher.score([Query("score", prompts[0], k=2, completion_ids=completion, logprob_start=1)])
    )

    sequence = list(prompts[0] + completion)
    expected = full_logprobs(reference_model, sequence, teacher.vocab_size)[:-1]
    actual_ids = torch.tensor(sequence[1:])
    expected_token = expected.gather(-1, actual_ids[:, None])[:, 0].numpy()
    np.testing.assert_allclose(out.token_logprob, expected_token, rtol=0, atol=TOLERANCE)
    outside = ~(out.topk_ids == actual_ids.numpy()[:, None]).any(axis=1)
    assert outside.sum() >= 5
    assert (out.token_logprob[outside] < out.topk_logprobs[outside].min(axis=1)).all()


def test_padded_logit_width_is_sliced_to_the_tokenizer(backend, prompts, reference_model):
    teacher, run = backend
    assert teacher.logit_width == PADDED_WIDTH > teacher.vocab_size
    (out,) = run(teacher.generate(greedy(prompts[:1], k=64)))
    assert (out.topk_ids < teacher.vocab_size).all()

    sequence = list(prompts[0]) + out.completion_ids
    start = len(prompts[0])
    sliced = full_logprobs(reference_model, sequence, teacher.vocab_size)[start - 1 : -1]
    padded = full_logprobs(reference_model, sequence, PADDED_WIDTH)[start - 1 : -1]
    expected = sliced.gather(-1, torch.from_numpy(out.topk_ids).long()).numpy()
    np.testing.assert_allclose(out.topk_logprobs, expected, rtol=0, atol=TOLERANCE)
    # The padding columns hold real mass here: not slicing would be far off.
    not_sliced = padded.gather(-1, torch.from_numpy(out.topk_ids).long()).numpy()
    assert np.abs(out.topk_logprobs - not_sliced).max() > 1.0


def test_same_seed_gives_the_same_sampled_completion(backend, prompts):
    teacher, run = backend

    def sampled(seed: int) -> Query:
        return Query(
            "generate",
            prompts[1],
            k=5,
            sampling=Sampling(max_tokens=24, temperature=1.0, seed=seed),
        )

    alone = run(teacher.generate([sampled(7)]))[0]
    in_a_batch = run(teacher.generate([*greedy(prompts[2:]), sampled(7)]))[-1]
    assert alone.completion_ids == in_a_batch.completion_ids
    others = run(teacher.generate([sampled(seed) for seed in (8, 9, 10)]))
    assert any(o.completion_ids != alone.completion_ids for o in others)


def test_generation_does_not_depend_on_its_batch(backend, prompts):
    teacher, run = backend
    requests = greedy(prompts)
    batched = run(teacher.generate(requests))
    for request, together in zip(requests, batched, strict=True):
        assert_same_teacher_output(run(teacher.generate([request]))[0], together)


def test_greedy_generation_scores_the_same_as_teacher_forcing_its_completion(backend, prompts):
    teacher, run = backend
    generated = run(teacher.generate(greedy(prompts, k=8)))
    scored = run(
        teacher.score(
            [
                Query("score", p, k=8, completion_ids=tuple(g.completion_ids))
                for p, g in zip(prompts, generated, strict=True)
            ]
        )
    )
    for g, s in zip(generated, scored, strict=True):
        assert_same_topk(g.topk_ids, g.topk_logprobs, s.topk_ids, s.topk_logprobs)
        np.testing.assert_allclose(g.token_logprob, s.token_logprob, rtol=0, atol=TOLERANCE)


def test_generation_stops_at_eos_or_after_max_tokens(backend, prompts):
    teacher, run = backend
    stopped, cut = run(
        teacher.generate([*greedy(prompts[:1]), *greedy(prompts[1:2], max_tokens=3)])
    )
    assert stopped.finish_reason == "stop"
    assert stopped.completion_ids[-1] == teacher.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_end|>" not in stopped.completion_text
    assert cut.finish_reason == "length"
    assert len(cut.completion_ids) == 3


def test_k_zero_keeps_only_the_token_logprob(backend, prompts):
    teacher, run = backend
    (out,) = run(teacher.generate(greedy(prompts[:1], k=0, max_tokens=5)))
    assert out.topk_ids.shape == out.topk_logprobs.shape == (5, 0)
    assert out.token_logprob.shape == (5,)
    assert (out.token_logprob < 0).all()


def test_requests_past_the_limits_are_refused(backend, prompts):
    teacher, run = backend
    # The service's own check (limits.py), with the same messages whoever calls.
    with pytest.raises(QueryError, match="^k: must be between 0 and"):
        run(teacher.generate(greedy(prompts[:1], k=teacher.max_k + 1)))
    with pytest.raises(QueryError, match="^prompt: .* no room in the teacher's context"):
        run(teacher.generate(greedy([(5,) * MAX_MODEL_LEN])))
