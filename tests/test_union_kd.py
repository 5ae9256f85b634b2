"""The on-policy loss on the union of the teacher's and the student's ids, against float64.

The references are dense: full-vocabulary probabilities, and for the bucketed case a
per-position loop that lists the union's distinct ids and pools everything else into
one outcome. Nothing is shared with the trainer's slots, masks or gathers.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_oracle import EPS, TINY, divergence

from distillcache.trainer.sparse_kd import LossSpec, chunked_head_loss, union_head_loss

DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 1.0), ("tvd", 0.5)]


def problem(n, hidden, vocab, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * scale / hidden**0.5
    teacher_logits = (h @ w.T) + torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(vocab, (n,), generator=g)
    return h, w, torch.softmax(teacher_logits, -1), labels


def service_answer(teacher_probs, student_logits, k, s):
    """What the score service returns: the teacher's top-k, and its exact log-probs at
    the student's own top-s ids (float32, as over the wire)."""
    values, topk_ids = teacher_probs.topk(k, -1)
    score_ids = student_logits.topk(s, -1).indices
    score_values = teacher_probs.gather(1, score_ids)
    return topk_ids, values.log().float(), score_ids, score_values.log().float()


def trainer_loss(name, beta, h, w, labels, answer, temperature=1.0, alpha=0.0):
    spec = LossSpec(
        vocab_size=w.shape[0],
        loss=name,
        beta=beta,
        temperature=temperature,
        alpha=alpha,
        chunk_size=3,
    )
    h_leaf = h.float().clone().requires_grad_()
    w_leaf = w.float().clone().requires_grad_()
    loss, stats = union_head_loss(h_leaf, w_leaf, labels, *answer, spec)
    loss.backward()
    return loss.detach().double(), stats.double(), h_leaf.grad.double(), w_leaf.grad.double()


def reference(loss_fn, h, w):
    h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = loss_fn(h_ref @ w_ref.T)
    loss.backward()
    return loss.detach(), h_ref.grad, w_ref.grad


@pytest.mark.parametrize(("name", "beta"), DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_union_covering_the_vocabulary_is_the_dense_divergence(name, beta, temperature):
    # The student's ids are its whole ranking, so the union is the vocabulary, with the
    # teacher's top-4 repeated in it and nothing left for the bucket.
    h, w, teacher_probs, labels = problem(n=7, hidden=8, vocab=12, seed=1)
    answer = service_answer(teacher_probs, h @ w.T, k=4, s=12)
    alpha = 0.25
    got, stats, h_grad, w_grad = trainer_loss(name, beta, h, w, labels, answer, temperature, alpha)

    def dense(logits):
        q = torch.softmax(teacher_probs.log() / temperature, -1)
        p = torch.softmax(logits / temperature, -1)
        kd = divergence(name, q, p, beta)
        ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        return ((1 - alpha) * temperature**2 * kd + alpha * ce).sum()

    want, want_h, want_w = reference(dense, h, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_grad, want_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_grad, want_w, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(stats).all()


def bucketed(probs, ids, floor):
    """One position: the distinct ``ids`` in order, then the rest pooled (float64)."""
    kept = probs[ids]
    rest = probs.sum() - kept.sum()
    if floor:
        kept, rest = kept.clamp(min=TINY), rest.clamp(min=EPS)
    return torch.cat([kept, rest.reshape(1)])


def dense_on_unions(name, beta, teacher_probs, unions):
    """The reference loss of student logits: at each position the divergence between the
    teacher and the student, each bucketed to ``unions[n]`` plus everything else."""

    def dense(logits):
        total = 0.0
        for n, union in enumerate(unions):
            q = bucketed(teacher_probs[n], union, floor=True)
            p = bucketed(torch.softmax(logits[n], -1), union, floor=False)
            total = total + divergence(name, (q / q.sum()).unsqueeze(0), p.unsqueeze(0), beta)
        return total.sum()

    return dense


@pytest.mark.parametrize(("name", "beta"), DIVERGENCES)
def test_a_strict_subset_union_is_the_dense_divergence_of_the_bucketed_distributions(name, beta):
    h, w, teacher_probs, labels = problem(n=9, hidden=8, vocab=40, seed=2)
    logits = h @ w.T
    answer = service_answer(teacher_probs, logits, k=5, s=4)
    topk_ids, _, score_ids, _ = answer
    overlaps = sum(
        len(set(a.tolist()) & set(b.tolist())) for a, b in zip(topk_ids, score_ids, strict=True)
    )
    assert overlaps > 0  # the case where an id is in both sets is exercised
    got, _, h_grad, w_grad = trainer_loss(name, beta, h, w, labels, answer)

    unions = [
        sorted(set(topk_ids[n].tolist()) | set(score_ids[n].tolist())) for n in range(len(topk_ids))
    ]
    want, want_h, want_w = reference(dense_on_unions(name, beta, teacher_probs, unions), h, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_grad, want_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_grad, want_w, rtol=1e-4, atol=1e-5)


def test_reverse_kl_on_the_union_is_exact_where_a_sampled_token_estimate_is_not():
    # A student whose mass lies in its top-6 (everything else 60 nats down), a teacher
    # with mass everywhere: reverse KL needs the teacher only where the student is.
    n, vocab, s = 16, 50, 6
    g = torch.Generator().manual_seed(3)
    teacher_probs = torch.softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2, -1)
    logits = torch.full((n, vocab), -60.0, dtype=torch.float64)
    chosen = torch.stack([torch.randperm(vocab, generator=g)[:s] for _ in range(n)])
    logits.scatter_(1, chosen, torch.randn(n, s, generator=g, dtype=torch.float64))
    student = torch.softmax(logits, -1)
    exact = (student * (student.log() - teacher_probs.log())).sum(-1)

    hidden, eye, labels = logits.float(), torch.eye(vocab), torch.zeros(n, dtype=torch.long)
    spec = LossSpec(vocab_size=vocab, loss="reverse_kl", chunk_size=5)
    answer = service_answer(teacher_probs, logits, k=4, s=s)
    union, _ = union_head_loss(hidden, eye, labels, *answer, spec)
    torch.testing.assert_close(union.double(), exact.sum(), rtol=1e-5, atol=1e-5)

    # The sampled-token estimate log p(y) - log q(y), y drawn from the student, is right
    # only on average: one draw per position misses the exact value.
    sampled = torch.multinomial(student, 1, generator=g).squeeze(1)
    estimate = (student.log() - teacher_probs.log()).gather(1, sampled.unsqueeze(1)).squeeze(1)
    assert (estimate - exact).abs().mean() > 0.3
    # So does the cache's view (the teacher's top-k and one bucket): the student's ids
    # outside the teacher's top-k are pooled.
    cached, _ = chunked_head_loss(hidden, eye, labels, answer[0], answer[1], tail_of(answer), spec)
    assert abs(cached.item() - exact.sum().item()) > 0.1 * exact.sum().item()


def tail_of(answer):
    _, values, _, _ = answer
    return torch.log(-torch.expm1(values.double().logsumexp(-1))).float()


def test_the_on_policy_loss_refuses_sft():
    h, w, teacher_probs, labels = problem(n=2, hidden=4, vocab=10, seed=0)
    answer = service_answer(teacher_probs, h @ w.T, k=2, s=2)
    with pytest.raises(ValueError, match="needs a divergence"):
        union_head_loss(h.float(), w.float(), labels, *answer, LossSpec(vocab_size=10, loss="sft"))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(3, 30),
    st.integers(1, 8),
    st.integers(1, 8),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1.0, 0.7, 2.0]),
)
def test_the_union_divergence_vanishes_for_a_student_equal_to_the_teacher(vocab, k, s, seed, t):
    k, s = min(k, vocab), min(s, vocab)
    g = torch.Generator().manual_seed(seed)
    teacher_probs = torch.softmax(torch.randn(4, vocab, generator=g, dtype=torch.float64) * 3, -1)
    logits = teacher_probs.log()
    # The student ranks its ids by a noisy copy, so the union overlaps the top-k only partly.
    ranking = logits + torch.randn(4, vocab, generator=g, dtype=torch.float64)
    answer = service_answer(teacher_probs, ranking, k=k, s=s)
    hidden, eye, labels = logits.float(), torch.eye(vocab), torch.zeros(4, dtype=torch.long)
    union_ids = [
        set(a.tolist()) | set(b.tolist()) for a, b in zip(answer[0], answer[2], strict=True)
    ]
    # Where the teacher's rest is below the tail floor the two sides differ on purpose.
    rest = torch.stack([1 - teacher_probs[n, sorted(u)].sum() for n, u in enumerate(union_ids)])
    exact = (rest > 2 * EPS) | torch.tensor([len(u) == vocab for u in union_ids])
    for name, beta in DIVERGENCES:
        spec = LossSpec(vocab_size=vocab, loss=name, beta=beta, temperature=t, chunk_size=1)
        for n in torch.nonzero(exact).flatten().tolist():
            loss, _ = union_head_loss(
                hidden[n : n + 1], eye, labels[n : n + 1], *[a[n : n + 1] for a in answer], spec
            )
            assert abs(loss.item()) < 1e-5, (name, n, loss.item())


@pytest.mark.parametrize(("name", "beta"), DIVERGENCES)
def test_an_adaptive_k_teachers_padding_is_no_outcome_of_the_union(name, beta):
    """The teacher keeps its own number of entries per position (adaptive k), padded with
    id -1 and -inf after them as the score service's Arrow answer decodes: the union is
    each position's kept ids and the student's, as if the padding were not there."""
    h, w, teacher_probs, labels = problem(n=9, hidden=8, vocab=40, seed=5)
    logits = h @ w.T
    topk_ids, values, score_ids, score_values = service_answer(teacher_probs, logits, k=6, s=4)
    counts = [1, 6, 3, 2, 5, 4, 1, 6, 2]
    for n, c in enumerate(counts):
        topk_ids[n, c:], values[n, c:] = -1, float("-inf")
    answer = (topk_ids, values, score_ids, score_values)
    got, _, h_grad, w_grad = trainer_loss(name, beta, h, w, labels, answer)

    unions = [
        sorted(set(topk_ids[n, :c].tolist()) | set(score_ids[n].tolist()))
        for n, c in enumerate(counts)
    ]
    want, want_h, want_w = reference(dense_on_unions(name, beta, teacher_probs, unions), h, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_grad, want_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_grad, want_w, rtol=1e-4, atol=1e-5)
