"""Temperature with the tail bucket: softening the pooled tail as the tail it stands for.

The reference is the exact softened teacher, ``softmax(log p / T)`` over the whole
vocabulary in float64, pooled to the top-k plus the rest afterwards.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillcache.trainer.losses import student_log_probs, teacher_log_probs, zipf_tail_entropy
from distillcache.trainer.sparse_kd import LossSpec, chunked_head_loss


def exact_softened_tail(probs: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Mass off the top-k of softmax(log p / T), from the full vocabulary (float64)."""
    soft = F.softmax(probs.log() / temperature, -1)
    top = probs.topk(k, -1).indices
    return 1 - soft.gather(1, top).sum(-1)


def stored(probs: torch.Tensor, k: int):
    """What the cache keeps: float32 top-k log-probs and the log of the mass outside."""
    values, ids = probs.topk(k, -1)
    rest = probs.sum(-1) - values.sum(-1)
    return ids, values.log().float(), rest.log().float()


def bucket_tail(values, tail, vocab, temperature, zipf=True):
    entropy = zipf_tail_entropy(values, tail, vocab, temperature) if zipf else None
    return teacher_log_probs(values, tail, temperature, "bucket", entropy)[:, -1].exp().double()


def zipf_teacher(vocab: int, k: int, exponent: float, span: float) -> torch.Tensor:
    """One distribution: a top-k falling geometrically by ``span`` from the first to the
    k-th probability, then a Zipf tail continuing from the k-th with ``exponent``."""
    top = span ** torch.linspace(1, 0, k, dtype=torch.float64)
    ranks = torch.arange(k + 1, vocab + 1, dtype=torch.float64)
    tail = top[-1] * (ranks / k) ** -exponent
    probs = torch.cat([top, tail])
    return (probs / probs.sum()).unsqueeze(0)


@pytest.mark.parametrize("temperature", [2.0, 4.0])
@pytest.mark.parametrize(("exponent", "k", "span"), [(1.1, 8, 1e3), (1.6, 20, 1e4), (2.5, 64, 1e2)])
def test_a_zipf_tail_is_softened_exactly(temperature, exponent, k, span):
    probs = zipf_teacher(vocab=49152, k=k, exponent=exponent, span=span)
    _, values, tail = stored(probs, k)
    want = exact_softened_tail(probs, k, temperature)
    got = bucket_tail(values, tail, 49152, temperature)
    # float32 storage and the midpoint sum past the first 64 tail ranks.
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    old = bucket_tail(values, tail, 49152, temperature, zipf=False)
    assert (old - want).abs().item() > 0.05


def test_a_flat_teachers_tail_grows_with_temperature_as_the_exact_one_does():
    # Top-3 above an even tail of 997 tokens: the exact softened tail mass rises with T,
    # while a tail tempered as one outcome falls. (Zipf from the last kept token is not
    # this tail's shape, but it is far closer than one token.)
    probs = torch.cat([torch.tensor([0.3, 0.2, 0.1]), torch.full((997,), 0.4 / 997)])
    probs = probs.double().unsqueeze(0)
    _, values, tail = stored(probs, 3)
    exact, new, old = [], [], []
    for temperature in (1.0, 1.5, 2.0, 4.0):
        exact.append(exact_softened_tail(probs, 3, temperature).item())
        new.append(bucket_tail(values, tail, 1000, temperature).item())
        old.append(bucket_tail(values, tail, 1000, temperature, zipf=False).item())
    assert np.all(np.diff(exact) > 0) and np.all(np.diff(new) > 0) and np.all(np.diff(old) < 0)
    errors_new, errors_old = np.abs(np.subtract(new, exact)), np.abs(np.subtract(old, exact))
    assert np.all(errors_new[1:] < 0.5 * errors_old[1:])


def test_the_issues_peaked_teacher_at_t2_k8():
    # The issue's case: a peaked teacher at T=2, k=8, where the tail tempered as one
    # outcome gave 0.113 and the exact softened tail 0.517.
    probs = zipf_teacher(vocab=49152, k=8, exponent=2.2, span=100.0)
    _, values, tail = stored(probs, 8)
    want = exact_softened_tail(probs, 8, 2.0).item()
    assert 0.4 < want < 0.6
    assert abs(bucket_tail(values, tail, 49152, 2.0).item() - want) < 2e-5 * want
    assert bucket_tail(values, tail, 49152, 2.0, zipf=False).item() < 0.5 * want


def test_at_t1_the_loss_is_exactly_the_untempered_one():
    g = torch.Generator().manual_seed(0)
    values = torch.log_softmax(torch.randn(6, 9, generator=g), -1)[:, :5]
    tail = torch.log(-torch.expm1(values.logsumexp(-1)))
    entropy = zipf_tail_entropy(values, tail, 9, 1.0)
    assert torch.equal(entropy, torch.zeros(6, dtype=torch.float64))
    any_entropy = torch.rand(6, generator=g, dtype=torch.float64) * 5
    assert torch.equal(
        teacher_log_probs(values, tail, 1.0, "bucket", any_entropy),
        teacher_log_probs(values, tail, 1.0, "bucket"),
    )
    logits, rest = torch.randn(6, 5, generator=g), torch.randn(6, generator=g)
    assert torch.equal(
        student_log_probs(logits, rest, 1.0, "bucket", any_entropy),
        student_log_probs(logits, rest, 1.0, "bucket"),
    )
    # And the trainer's loss at T=1: the k+1 outcomes with no tempering at all.
    teacher_logits = torch.randn(6, 9, generator=g, dtype=torch.float64) * 2
    hidden = torch.randn(6, 9, generator=g)
    ids, stored_values, stored_tail = stored(F.softmax(teacher_logits, -1), 5)
    spec = LossSpec(vocab_size=9, loss="forward_kl", temperature=1.0)
    got, _ = chunked_head_loss(
        hidden,
        torch.eye(9),
        torch.zeros(6, dtype=torch.long),
        ids,
        stored_values,
        stored_tail,
        spec,
    )
    q = torch.cat([stored_values, stored_tail.unsqueeze(-1)], -1).double().exp()
    student = F.softmax(hidden.double(), -1)
    p = torch.cat([student.gather(1, ids), 1 - student.gather(1, ids).sum(-1, keepdim=True)], -1)
    want = (q * (q.log() - p.log())).sum()
    assert math.isclose(got.item(), want.item(), rel_tol=1e-5)


def test_the_divergence_vanishes_when_the_student_pools_like_the_teacher_at_any_t():
    # Both tails are softened with the teacher's shape: equal pooled distributions at T=1
    # stay equal at every T, whatever the student's tail looks like inside.
    g = torch.Generator().manual_seed(1)
    values = torch.log_softmax(torch.randn(4, 50, generator=g) * 2, -1).topk(6).values
    tail = torch.log(-torch.expm1(values.logsumexp(-1)))
    for temperature in (0.5, 2.0, 4.0):
        entropy = zipf_tail_entropy(values, tail, 50, temperature)
        teacher = teacher_log_probs(values, tail, temperature, "bucket", entropy)
        student = student_log_probs(values + 3.0, tail + 3.0, temperature, "bucket", entropy)
        torch.testing.assert_close(student, teacher)
