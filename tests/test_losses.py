"""The sparse losses against naive dense references built at full vocabulary in the test.

The references are written independently of trainer/losses.py: probabilities instead of
log-probs, masks instead of gathers, and plain autograd through full [N, vocab] tensors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_oracle import bucket_pair

from distillcache.shared.codec import tail_logprob
from distillcache.trainer.losses import (
    TAIL_FLOOR,
    combine,
    divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    student_log_probs,
    teacher_log_probs,
    total_variation,
    zipf_tail_entropy,
)
from distillcache.trainer.sparse_kd import LossSpec, chunked_head_loss, chunked_head_metrics

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def dense_divergence(name: str, q: torch.Tensor, p: torch.Tensor, beta: float) -> torch.Tensor:
    """Textbook formulas over probability tensors [N, K] (teacher q, student p)."""

    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)

    if name == "forward_kl":
        return kl(q, p)
    if name == "reverse_kl":
        return kl(p, q)
    if name == "jsd":
        m = beta * q + (1 - beta) * p
        return beta * kl(q, m) + (1 - beta) * kl(p, m)
    return 0.5 * (q - p).abs().sum(-1)


def sparse_teacher(teacher_logits: torch.Tensor, k: int):
    """What the cache stores for full teacher logits: top-k ids, raw log-probs, tail."""
    logprobs = F.log_softmax(teacher_logits.double(), -1).float()
    values, ids = logprobs.topk(k, dim=-1)
    tail = torch.from_numpy(tail_logprob(values.numpy()))
    return ids, values, tail


def coarse_grained(probs: torch.Tensor, ids: torch.Tensor, tail: str) -> torch.Tensor:
    """A full distribution [N, V] seen on the top-k ids (renormalized) or ids + rest."""
    kept = probs.gather(1, ids)
    if tail == "renormalize":
        return kept / kept.sum(-1, keepdim=True)
    rest = probs.masked_fill(torch.zeros_like(probs, dtype=torch.bool).scatter(1, ids, True), 0)
    return torch.cat([kept, rest.sum(-1, keepdim=True)], -1)


def dense_reference_loss(hidden, weight, labels, teacher_logits, k, spec: LossSpec):
    """Naive KD: full student logits, a dense tempered teacher, a full-vocab divergence."""
    logits = hidden @ weight[: spec.vocab_size].T
    t = spec.temperature
    ids, values, tail = sparse_teacher(teacher_logits, k)
    if spec.tail == "bucket" and k < spec.vocab_size:
        # Floors, pooling and the Zipf-softened tail: tests/loss_oracle.py.
        q, p = bucket_pair(
            F.softmax(teacher_logits.double(), -1), F.softmax(logits.double(), -1), ids, t
        )
    else:
        q = coarse_grained(F.softmax(teacher_logits.double() / t, -1), ids, "renormalize")
        p = coarse_grained(F.softmax(logits.double() / t, -1), ids, "renormalize")
    kd = dense_divergence(spec.loss, q, p, spec.beta)
    ce = F.cross_entropy(logits.double(), labels, reduction="none")
    return ((1 - spec.alpha) * t**2 * kd + spec.alpha * ce).sum(), (ids, values, tail)


def random_problem(n=13, hidden=16, vocab=40, width=None, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(width or vocab, hidden, generator=g) * scale / math.sqrt(hidden)
    teacher_logits = torch.randn(n, vocab, generator=g) * scale
    labels = torch.randint(vocab, (n,), generator=g)
    return h, w, teacher_logits, labels


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_pure_losses_equal_dense_full_vocabulary_losses_when_k_covers_vocabulary(name, tail):
    g = torch.Generator().manual_seed(1)
    vocab, temperature, beta = 50, 1.7, 0.3
    teacher_logits = torch.randn(9, vocab, generator=g) * 4
    student_logits = torch.randn(9, vocab, generator=g) * 4
    ids, values, tail_lp = sparse_teacher(teacher_logits, vocab)
    rest = student_logits.scatter(1, ids, float("-inf")).logsumexp(-1)
    # With k = vocab the bucket is empty, which the trainer runs as renormalize.
    mode = "renormalize" if tail == "bucket" else tail
    teacher = teacher_log_probs(values, tail_lp, temperature, mode)
    student = student_log_probs(student_logits.gather(1, ids), rest, temperature, mode)
    got = divergence(name, teacher, student, beta)
    q = F.softmax(teacher_logits.double() / temperature, -1)
    p = F.softmax(student_logits.double() / temperature, -1)
    want = dense_divergence(name, q, p, beta)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("k", [40, 7])
def test_chunked_head_loss_and_gradients_equal_naive_dense_kd(name, tail, k):
    h, w, teacher_logits, labels = random_problem(vocab=40)
    spec = LossSpec(
        vocab_size=40, loss=name, beta=0.4, temperature=2.0, alpha=0.25, tail=tail, chunk_size=4
    )
    h_ref, w_ref = h.clone().double().requires_grad_(), w.clone().double().requires_grad_()
    want, (ids, values, tail_lp) = dense_reference_loss(
        h_ref, w_ref, labels, teacher_logits, k, spec
    )
    want.backward()
    h_got, w_got = h.clone().requires_grad_(), w.clone().requires_grad_()
    got, _ = chunked_head_loss(h_got, w_got, labels, ids, values, tail_lp, spec)
    got.backward()
    torch.testing.assert_close(got.double(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_got.grad.double(), h_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_got.grad.double(), w_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_adaptive_k_padding_equals_naive_dense_kd_on_each_positions_own_k(name, tail, temperature):
    """An adaptive-k batch (each position its own k, padded with id -1 and -inf, as
    shared.reader decodes it) against the dense reference run position by position with
    that position's k: the padding must be no outcome, on either side, at any T."""
    vocab, width = 40, 9
    h, w, teacher_logits, labels = random_problem(n=11, vocab=vocab, seed=3)
    spec = LossSpec(
        vocab_size=vocab,
        loss=name,
        beta=0.4,
        temperature=temperature,
        alpha=0.25,
        tail=tail,
        chunk_size=4,
    )
    counts = [1, 9, 3, 5, 2, 9, 4, 1, 7, 6, 8]
    g = torch.Generator().manual_seed(7)
    h_ref, w_ref = h.clone().double().requires_grad_(), w.clone().double().requires_grad_()
    ids = torch.full((len(counts), width), -1, dtype=torch.long)
    values = torch.full((len(counts), width), float("-inf"))
    tails = torch.empty(len(counts))
    want = torch.zeros((), dtype=torch.float64)
    for j, n in enumerate(counts):
        row = slice(j, j + 1)
        loss, (kept, lps, tail_lp) = dense_reference_loss(
            h_ref[row], w_ref, labels[row], teacher_logits[row], n, spec
        )
        want = want + loss
        # The kept entries in any order, the padding after them (the reader's layout).
        order = torch.randperm(n, generator=g)
        ids[j, :n], values[j, :n], tails[j] = kept[0, order], lps[0, order], tail_lp[0]
    want.backward()
    h_got, w_got = h.clone().requires_grad_(), w.clone().requires_grad_()
    got, _ = chunked_head_loss(h_got, w_got, labels, ids, values, tails, spec)
    got.backward()
    torch.testing.assert_close(got.double(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_got.grad.double(), h_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_got.grad.double(), w_ref.grad, atol=1e-5, rtol=1e-5)
    # Evaluation's KL is the same forward KL at T=1 with a tail bucket.
    metric_spec = LossSpec(vocab_size=vocab, loss="forward_kl", tail="bucket")
    kl = sum(
        dense_reference_loss(
            h[j : j + 1].double(),
            w.double(),
            labels[j : j + 1],
            teacher_logits[j : j + 1],
            n,
            metric_spec,
        )[0].item()
        for j, n in enumerate(counts)
    )
    totals = chunked_head_metrics(h, w, labels, ids, values, tails, vocab, chunk_size=4)
    assert totals[0].item() == pytest.approx(kl, rel=1e-5, abs=1e-5)


def test_sft_loss_is_summed_cross_entropy_with_its_gradients():
    h, w, _, labels = random_problem()
    spec = LossSpec(vocab_size=40, loss="sft", chunk_size=5)
    h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = F.cross_entropy(h_ref @ w_ref.T, labels, reduction="sum")
    want.backward()
    h_got, w_got = h.clone().requires_grad_(), w.clone().requires_grad_()
    got, stats = chunked_head_loss(h_got, w_got, labels, None, None, None, spec)
    got.backward()
    torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(stats[1], want.detach())
    torch.testing.assert_close(h_got.grad, h_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_got.grad, w_ref.grad, atol=1e-5, rtol=1e-5)


def test_padded_logit_rows_are_ignored_and_get_no_gradient():
    h, w, teacher_logits, labels = random_problem(vocab=40, width=48)
    ids, values, tail_lp = sparse_teacher(teacher_logits, 8)
    spec = LossSpec(vocab_size=40, loss="forward_kl", alpha=0.5, chunk_size=6)
    w_padded = w.clone().requires_grad_()
    padded, _ = chunked_head_loss(h, w_padded, labels, ids, values, tail_lp, spec)
    padded.backward()
    w_cut = w[:40].clone().requires_grad_()
    cut, _ = chunked_head_loss(h, w_cut, labels, ids, values, tail_lp, spec)
    cut.backward()
    torch.testing.assert_close(padded, cut)
    assert torch.equal(w_padded.grad[40:], torch.zeros(8, w.shape[1]))
    torch.testing.assert_close(w_padded.grad[:40], w_cut.grad)


def test_bf16_autocast_runs_the_head_in_bf16_and_stays_close_to_float32():
    h, w, teacher_logits, labels = random_problem(n=20, hidden=32, vocab=64)
    ids, values, tail_lp = sparse_teacher(teacher_logits, 8)
    spec = LossSpec(vocab_size=64, alpha=0.3, chunk_size=8)
    results = []
    for enabled in (False, True):
        h_leaf, w_leaf = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss, _ = chunked_head_loss(h_leaf, w_leaf, labels, ids, values, tail_lp, spec)
        loss.backward()
        assert w_leaf.grad.dtype == torch.float32
        results.append((loss.detach(), h_leaf.grad, w_leaf.grad))
    (loss32, gh32, gw32), (loss16, gh16, gw16) = results
    assert not torch.equal(gw32, gw16)
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    for low, full in ((gh16, gh32), (gw16, gw32)):
        assert (low - full).norm() < 0.05 * full.norm()


def test_loss_scales_with_the_incoming_gradient():
    h, w, teacher_logits, labels = random_problem()
    ids, values, tail_lp = sparse_teacher(teacher_logits, 5)
    spec = LossSpec(vocab_size=40, chunk_size=3)
    grads = []
    for factor in (1.0, 0.25):
        h_leaf = h.clone().requires_grad_()
        loss, _ = chunked_head_loss(h_leaf, w, labels, ids, values, tail_lp, spec)
        (loss * factor).backward()
        grads.append(h_leaf.grad)
    torch.testing.assert_close(grads[1], grads[0] * 0.25)


def test_metrics_report_kl_agreement_and_cross_entropy_of_the_teacher_tokens():
    h, w, _, labels = random_problem(vocab=40)
    teacher_logits = h @ w.T
    ids, values, tail_lp = sparse_teacher(teacher_logits, 40)
    sums = chunked_head_metrics(h, w, labels, ids, values, tail_lp, vocab_size=40, chunk_size=4)
    kl, agree, ce, count = sums.tolist()
    assert count == 13 and agree == 13
    assert abs(kl) < 1e-5
    assert ce == pytest.approx(
        F.cross_entropy(teacher_logits, labels, reduction="sum").item(), rel=1e-5
    )


def test_combine_applies_temperature_squared_and_alpha():
    kd, ce = torch.tensor([0.5]), torch.tensor([2.0])
    assert combine(kd, ce, temperature=2.0, alpha=0.25).item() == pytest.approx(
        0.75 * 4 * 0.5 + 0.25 * 2.0
    )


@st.composite
def distributions(draw):
    """Random teacher/student logits with a top-k and temperature, as the cache sees them."""
    vocab = draw(st.integers(2, 24))
    k = draw(st.integers(1, vocab))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.1, 6.0))
    temperature = draw(st.floats(0.5, 4.0))
    tail = draw(st.sampled_from(["renormalize", "bucket"]))
    g = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(5, vocab, generator=g, dtype=torch.float64) * scale
    student_logits = torch.randn(5, vocab, generator=g, dtype=torch.float64) * scale
    return teacher_logits, student_logits, k, temperature, tail


def sparse_pair(teacher_logits, student_logits, k, temperature, tail):
    """Teacher and student log-probs on the tail mode's outcomes, as the trainer builds them."""
    vocab = teacher_logits.shape[-1]
    logprobs = F.log_softmax(teacher_logits, -1)
    values, ids = logprobs.topk(k, -1)
    kept = values.logsumexp(-1).clamp(max=0)
    tail_lp = torch.log(-torch.expm1(kept))
    mode = LossSpec(vocab_size=vocab, tail=tail).tail_for(k)
    rest = student_logits.scatter(1, ids, float("-inf")).logsumexp(-1)
    spread = zipf_tail_entropy(values, tail_lp, vocab, temperature) if mode == "bucket" else None
    teacher = teacher_log_probs(values, tail_lp, temperature, mode, spread).double()
    student = student_log_probs(student_logits.gather(1, ids), rest, temperature, mode, spread)
    return teacher, student.double()


@settings(max_examples=60, deadline=None)
@given(distributions(), st.floats(0.0, 1.0))
def test_divergences_are_nonnegative_and_bounded(problem, beta):
    teacher, student = sparse_pair(*problem)
    for name in DIVERGENCES:
        assert (divergence(name, teacher, student, beta) >= -1e-6).all(), name
    assert (total_variation(teacher, student) <= 1 + 1e-6).all()
    if 0 < beta < 1:
        entropy = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
        assert (generalized_jsd(teacher, student, beta) <= entropy + 1e-6).all()


@settings(max_examples=60, deadline=None)
@given(distributions(), st.floats(0.0, 1.0))
def test_divergences_vanish_when_student_equals_teacher(problem, beta):
    teacher_logits, _, k, temperature, tail = problem
    teacher, student = sparse_pair(teacher_logits, teacher_logits.clone(), k, temperature, tail)
    # A teacher tail below the float32 capture floor is raised to it (TAIL_FLOOR), so
    # there the two sides differ on purpose.
    logprobs = F.log_softmax(teacher_logits, -1)
    above_floor = torch.log(-torch.expm1(logprobs.topk(k, -1).values.logsumexp(-1))) > TAIL_FLOOR
    exact = above_floor | (tail == "renormalize" or k == teacher_logits.shape[-1])
    for name in DIVERGENCES:
        value = divergence(name, teacher, student, beta)[exact]
        assert (value.abs() < 1e-6).all(), (name, value)


@settings(max_examples=40, deadline=None)
@given(distributions())
def test_jsd_gradients_point_like_forward_kl_at_beta_zero_and_reverse_kl_at_one(problem):
    teacher_logits, student_logits, k, temperature, tail = problem
    student_logits = student_logits.clone().requires_grad_()
    teacher, student = sparse_pair(teacher_logits, student_logits, k, temperature, tail)
    torch.testing.assert_close(generalized_jsd(teacher, student, 0.0), forward_kl(teacher, student))
    torch.testing.assert_close(generalized_jsd(teacher, student, 1.0), reverse_kl(teacher, student))
    # JSD(beta) = beta KL(q||p) + O(beta^2 * max q/p): the first-order term leads only once
    # beta is small against the smallest probability ratio of the two distributions.
    log_ratio = (teacher - student).abs().max().item()
    epsilon = 1e-4 * math.exp(-log_ratio)

    def grad(fn):
        teacher, student = sparse_pair(teacher_logits, student_logits, k, temperature, tail)
        (g,) = torch.autograd.grad(fn(teacher, student).sum(), student_logits)
        return g.flatten()

    # Below ~1e-12 float64 cannot resolve the first-order term (nor 1 - epsilon from 1):
    # such extreme pairs only get the exact end-point checks above.
    ends = [(epsilon, forward_kl), (1.0 - epsilon, reverse_kl)] if epsilon > 1e-12 else []
    for beta, kl in ends:
        jsd_grad, kl_grad = grad(lambda t, s, b=beta: generalized_jsd(t, s, b)), grad(kl)
        if kl_grad.norm() < 1e-12:
            continue
        cosine = (jsd_grad / jsd_grad.norm()) @ (kl_grad / kl_grad.norm())
        assert cosine > 0.999, (beta, cosine)


def test_reverse_kl_stays_finite_when_the_teacher_reports_no_tail():
    topk = torch.log(torch.tensor([[0.5, 0.5]]))
    teacher = teacher_log_probs(topk, torch.tensor([float("-inf")]), 1.0, "bucket")
    student = torch.log(torch.tensor([[0.4, 0.4, 0.2]]))
    assert torch.isfinite(reverse_kl(teacher, student)).all()
    assert np.isfinite(generalized_jsd(teacher, student, 0.5).numpy()).all()
