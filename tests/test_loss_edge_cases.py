"""Edge cases of the sparse losses against the float64 dense oracle of tests/loss_oracle.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from loss_oracle import bucket_pair, divergence, pooled

from distillcache.shared.manifest import DatasetError
from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import DatasetInfo
from distillcache.shared.writer import ShardWriter
from distillcache.trainer.sparse_kd import LossSpec, chunked_head_loss
from distillcache.trainer.stream import ShardSource
from distillcache.trainer.teacher_check import first_bad_position


def oracle_loss(name, student_logits, teacher_probs, ids, temperature=1.0, beta=0.5):
    """Summed T**2 * divergence of the pooled, floored, softened distributions (float64)."""
    q, p = bucket_pair(teacher_probs, torch.softmax(student_logits, -1), ids, temperature)
    return temperature**2 * divergence(name, q, p, beta).sum()


def stored_teacher(teacher_probs, k):
    """What a shard holds: top-k ids, float32 log-probs, float32 log of the rest."""
    values, ids = teacher_probs.topk(k, -1)
    return ids, values.log().float(), pooled(teacher_probs, ids)[:, -1].log().float()


def head_loss_and_grad(name, logits, ids, values, tail, temperature=1.0, beta=0.5):
    """The trainer's loss with an identity head, so hidden states are the logits."""
    n, vocab = logits.shape
    hidden = logits.clone().float().requires_grad_()
    spec = LossSpec(vocab_size=vocab, loss=name, beta=beta, temperature=temperature, chunk_size=3)
    loss, _ = chunked_head_loss(
        hidden, torch.eye(vocab), torch.zeros(n, dtype=torch.long), ids, values, tail, spec
    )
    loss.backward()
    return loss.detach().double(), hidden.grad.double()


def oracle_loss_and_grad(name, logits, teacher_probs, ids, temperature=1.0, beta=0.5):
    z = logits.clone().double().requires_grad_()
    loss = oracle_loss(name, z, teacher_probs, ids, temperature, beta)
    loss.backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize(
    ("name", "beta"), [("reverse_kl", 0.5), ("jsd", 1.0), ("jsd", 0.5), ("forward_kl", 0.5)]
)
def test_a_minus_inf_inside_the_top_k_is_floored_like_the_tail(name, beta):
    # A teacher that masks most of the vocabulary: its top-4 holds a zero-probability id
    # and nothing is left for the tail. The student puts mass everywhere.
    g = torch.Generator().manual_seed(3)
    teacher_probs = torch.zeros(5, 8, dtype=torch.float64)
    teacher_probs[:, :3] = torch.softmax(torch.randn(5, 3, generator=g, dtype=torch.float64), -1)
    ids, values, tail = stored_teacher(teacher_probs, 4)
    assert torch.isneginf(values).any() and torch.isneginf(tail).all()
    logits = torch.randn(5, 8, generator=g, dtype=torch.float64) * 2
    got, got_grad = head_loss_and_grad(name, logits, ids, values, tail, beta=beta)
    want, want_grad = oracle_loss_and_grad(name, logits, teacher_probs, ids, beta=beta)
    assert torch.isfinite(got) and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "k", "temperature", "gap"),
    [
        ("forward_kl", 3, 1.0, 200.0),
        ("forward_kl", 1, 10.0, 200.0),
        ("reverse_kl", 3, 1.0, 200.0),
        ("jsd", 1, 10.0, 300.0),
        ("tvd", 2, 2.0, 200.0),
    ],
)
def test_a_very_confident_student_keeps_its_exact_tail(name, k, temperature, gap):
    # The student's top token (one of the teacher's top-k) is `gap` nats above the rest:
    # every other logit underflows exp(z - max) in float32, yet its tail mass is e^-gap,
    # far above float32's smallest number in log space.
    g = torch.Generator().manual_seed(5)
    vocab = 16
    teacher_probs = torch.softmax(torch.randn(4, vocab, generator=g, dtype=torch.float64), -1)
    ids, values, tail = stored_teacher(teacher_probs, k)
    logits = torch.randn(4, vocab, generator=g, dtype=torch.float64)
    logits.scatter_(1, ids[:, :1], gap)
    got, got_grad = head_loss_and_grad(name, logits, ids, values, tail, temperature)
    want, want_grad = oracle_loss_and_grad(name, logits, teacher_probs, ids, temperature)
    assert torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)


def write_one_row(root: Path, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray) -> Path:
    """A real shard (through the writer) whose only row carries the given teacher rows."""
    info = DatasetInfo(
        teacher_model="synthetic",
        tokenizer="synthetic",
        tokenizer_hash="0" * 64,
        vocab_size=50,
        logit_width=50,
        k=ids.shape[1],
        logprob_codec="float32",
        backend="test",
        backend_version="0",
    )
    n = ids.shape[0]
    with ShardWriter(root, info, writer_id="w") as writer:
        writer.write(
            SequenceRecord(
                key="row-with-a-bad-position",
                prompt_ids=np.array([1, 2]),
                completion_ids=np.arange(3, 3 + n - 1),
                logprob_start=1,
                topk_ids=ids,
                topk_logprobs=logprobs,
                token_logprob=np.zeros(n, np.float32),
                tail_logprob=tail,
            )
        )
    return root


def good_rows(n=4, k=3):
    ids = np.stack([np.arange(i, i + k) for i in range(n)]).astype(np.int32)
    logprobs = np.log(np.full((n, k), 0.2, np.float32))
    return ids, logprobs, np.full(n, np.log(0.4), np.float32)


def load_all(root: Path):
    source = ShardSource(root)
    return [example for unit in source.units() for example in source.load(unit)]


def test_good_rows_with_minus_inf_decode(tmp_path):
    ids, logprobs, tail = good_rows()
    logprobs[1, 0] = -np.inf
    tail[2] = -np.inf
    (example,) = load_all(write_one_row(tmp_path, ids, logprobs, tail))
    assert np.isneginf(example.tail_logprob).sum() == 1


def test_a_nan_tail_is_refused_at_decode_naming_shard_row_and_position(tmp_path):
    ids, logprobs, tail = good_rows()
    tail[2] = np.nan
    root = write_one_row(tmp_path, ids, logprobs, tail)
    with pytest.raises(
        DatasetError,
        match=r"\.parquet: row group 0, row row-with-a-bad-p.*"
        r"scored position 2: tail_logprob is nan",
    ):
        load_all(root)


def test_a_repeated_top_k_id_is_refused_at_decode(tmp_path):
    ids, logprobs, tail = good_rows()
    ids[3] = [7, 9, 7]
    root = write_one_row(tmp_path, ids, logprobs, tail)
    with pytest.raises(DatasetError, match=r"scored position 3: top-k id 7 occurs twice"):
        load_all(root)


def test_the_first_bad_position_is_named_when_there_are_several(tmp_path):
    ids, logprobs, tail = good_rows()
    ids[3] = [7, 9, 7]
    tail[1] = np.inf
    root = write_one_row(tmp_path, ids, logprobs, tail)
    with pytest.raises(DatasetError, match=r"scored position 1: tail_logprob is inf"):
        load_all(root)


def test_the_oracle_itself_sees_the_confident_students_tail():
    # Guards the oracle: at a 200-nat gap float64 still resolves the student's tail.
    p = pooled(
        torch.softmax(torch.tensor([[200.0, 0.0, 0.0]], dtype=torch.float64), -1),
        torch.tensor([[0]]),
    )
    assert math.isclose(p[0, 1].log().item(), -200.0 + math.log(2), rel_tol=1e-12)


def test_rows_out_of_the_writers_order_are_still_checked_for_repeats():
    ids, logprobs, tail = good_rows(n=5, k=4)
    ids[1] = [9, 3, 5, 1]  # unsorted, distinct: fine
    assert first_bad_position(ids, logprobs, tail) is None
    ids[4] = [8, 2, 8, 6]  # unsorted with a repeat
    assert first_bad_position(ids, logprobs, tail) == (
        4,
        "top-k id 8 occurs twice (a position's ids are distinct)",
    )
