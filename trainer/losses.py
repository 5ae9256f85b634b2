"""Divergences between the teacher's cached top-k distribution and the student's.

Pure functions over tensors; nothing here knows about models, batches or chunking.

The cache holds, per scored position, the teacher's raw (T=1) log-probs ``t_i`` on its
top-k ids ``S`` and the log of the mass outside them, ``tau = log(1 - sum_S exp(t_i))``.
A divergence needs both distributions on one set of outcomes, which the tail mode picks:

- ``renormalize``: the outcomes are the k ids of ``S``. The teacher is
  ``q_i = softmax(t / T)_i`` over ``S`` and the student ``p_i = softmax(z_S / T)_i``, its
  logits ``z`` renormalized on the same ids. Nothing is said about mass outside ``S``:
  top-k KD is biased (Anshumann et al. 2025) and, with only the teacher renormalized, a
  student learns to put all its mass on the top-k; renormalizing the student too removes
  that push but gives no target for the mass outside, which the bucket does.
- ``bucket``: the outcomes are the k ids plus one bucket for everything else (the tail
  bucket of Anshumann et al. 2025, "Sparse Logit Sampling"). At T=1 the teacher is ``[t, tau]``, exactly its
  distribution coarse-grained to k+1 outcomes, and the student is its full-vocabulary
  distribution pooled the same way: ``[z_S, lse_{V minus S}(z)] - lse(z)``. Forward KL
  here is a lower bound of the full-vocabulary KL (equal when k covers the vocabulary),
  and the student is told how much mass belongs off the teacher's support.

Temperature (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network") is meant
to soften the teacher's full distribution, ``softmax(L / T)``, and the divergence is
multiplied by T**2 so its gradients keep their size as T changes. On the top-k that is
exact: ``softmax(t / T)`` restricted to ``S`` (``renormalize`` is just that). The pooled
tail is not a probability that can be raised to 1/T: softened, a tail of mass ``m``
spread over tokens in proportions ``w`` (summing to one) weighs
``sum_j (m w_j)**(1/T) = m**(1/T) * exp((1 - 1/T) * H)``, where ``H`` is the Renyi
entropy of order 1/T of ``w`` (the log of the tail's effective number of tokens). So the
bucket's tempered log-weight is ``tau / T + (1 - 1/T) * H`` and the cache must assume
``H``. ``H = 0`` (the tail is one token: the bucket before, and the default of these
functions) underestimates it badly, since at T=2 the real tail of a 49k-token vocabulary
holds most of the softened mass; ``H = log(V - k)`` (maximum entropy: the mass spread
evenly) is an upper bound. ``zipf_tail_entropy`` assumes the tail continues Zipf's law
from the last kept token, ``p_r = p_k (r / k)**-b`` for ranks ``r = k+1 .. V``, with the
one exponent ``b`` that gives it exactly its stored mass; docs/trainer.md measures the
three against the exact softened teacher on real text. At T=1 the term vanishes and the
loss is the one without temperature whatever ``H``.

The student's pooled tail ``r`` goes through the same map, ``r / T + (1 - 1/T) * H`` with
the teacher's ``H``: both tails are taken to have the teacher's shape, so the divergence
still vanishes exactly when the two coarse-grained distributions agree, and T changes the
weighting, never the optimum. (Softening the student's tail exactly, which its logits
would allow, would pull its tail toward whatever shape error the assumed ``H`` has.)

Reverse KL and JSD over a cached top-k are approximations whatever the tail mode: the
cache cannot say how the teacher rates tokens outside its top-k that the student puts
mass on, which these divergences weigh by the student's probability. The on-policy path
(live teacher, GKD; Agarwal et al. 2024) scores the student's own tokens instead.

On-policy, the live teacher also returns its exact log-probs at ids the student chose
(``score_ids``, the student's own top-k), and ``union_teacher_log_probs`` builds the
outcomes: the union ``U`` of both id sets plus one bucket for the rest of the mass on
each side. Both sides are then exact on ``U``, so reverse KL is exact wherever the
student's mass lies in its top-k, which a sampled-token estimate (``log p(y) - log q(y)``
for the one token drawn) is only on average. An id in both sets keeps its first slot; its
second slot is an empty outcome (-inf on both sides), so slots are a fixed [N, k + s].
Where ``U`` covers the vocabulary the bucket is empty on both sides too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import Divergence, TailMode

# The tail is captured from float32 log-probs, whose kept mass is only known to about
# float32 epsilon; a smaller stored tail (or -inf) is noise. Flooring it there keeps
# reverse KL finite when the student puts mass where the teacher reported none.
TAIL_FLOOR = math.log(torch.finfo(torch.float32).eps)
# A top-k log-prob is exact in log space (a float32 log-softmax), so it is floored only
# where float32 probabilities end, at the smallest normal number: what is left is -inf, a
# logit the teacher masked. Unfloored, one such id makes reverse KL and JSD(1) infinite
# with all-NaN gradients wherever the student puts mass on it; floored, it costs the
# student 87 nats per unit of mass there. A floor at epsilon, like the tail's, would
# change exact losses: at T > 1 the floored probabilities are raised to the power 1/T.
TOPK_FLOOR = math.log(torch.finfo(torch.float32).tiny)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Softmaxes in bf16/fp16 lose the small probabilities KD is about; float64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _tempered(logits: torch.Tensor, temperature: float, tail_entropy) -> torch.Tensor:
    """``log_softmax`` of T=1 log-weights at temperature T, the last one a pooled tail
    whose mass is spread with Renyi entropy ``tail_entropy`` (None: one token)."""
    scaled = logits / temperature
    if tail_entropy is not None and temperature != 1.0:
        spread = (1.0 - 1.0 / temperature) * torch.as_tensor(tail_entropy, dtype=scaled.dtype)
        scaled = torch.cat([scaled[..., :-1], (scaled[..., -1] + spread).unsqueeze(-1)], dim=-1)
    return F.log_softmax(scaled, dim=-1)


def teacher_log_probs(
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    temperature: float,
    tail: TailMode,
    tail_entropy: torch.Tensor | float | None = None,
    empty: torch.Tensor | None = None,
) -> torch.Tensor:
    """The teacher's log-probs at temperature T over the tail mode's outcomes.

    ``topk_logprobs`` [N, k] raw T=1 log-probs, ``tail_logprob`` [N] log of the mass
    outside the top-k, floored at ``TOPK_FLOOR`` and ``TAIL_FLOOR``. Returns [N, k] (renormalize) or
    [N, k+1] (bucket, tail last): ``log q = log_softmax(t / T)`` over the k (or k+1)
    outcomes, which also repairs a stored top-k whose quantized probabilities do not sum
    with the tail to exactly one. ``tail_entropy`` [N] or a number (bucket, T != 1): the
    Renyi entropy of order 1/T assumed for the tail's shape (module docstring); None
    tempers the tail as one token. ``empty`` [N, k] marks slots that hold no outcome (the
    padding of an adaptive-k position): -inf there, never floored.
    """
    logits = _at_least_float32(topk_logprobs).clamp(min=TOPK_FLOOR)
    if empty is not None:
        logits = logits.masked_fill(empty, -math.inf)
    if tail == "bucket":
        floored = _at_least_float32(tail_logprob).clamp(min=TAIL_FLOOR)
        logits = torch.cat([logits, floored.unsqueeze(-1)], dim=-1)
        return _tempered(logits, temperature, tail_entropy)
    return F.log_softmax(logits / temperature, dim=-1)


def student_log_probs(
    topk_logits: torch.Tensor,
    logsumexp_rest: torch.Tensor | None,
    temperature: float,
    tail: TailMode,
    tail_entropy: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The student's log-probs at temperature T over the same outcomes as the teacher's.

    ``topk_logits`` [N, k]: the student's raw logits ``z`` at the teacher's top-k ids.
    For ``bucket``, ``logsumexp_rest`` [N] is ``lse(z)`` over the ids outside the top-k,
    the logit of the pooled tail, and the result is ``log_softmax([z_S, lse_rest] / T)``
    [N, k+1]; for ``renormalize`` it is ``log_softmax(z_S / T)`` [N, k] (and
    ``logsumexp_rest`` is unused). The student's normalizer cancels out of both.
    ``tail_entropy``: the teacher's, so that both tails are softened alike.
    """
    logits = _at_least_float32(topk_logits)
    if tail == "bucket":
        if logsumexp_rest is None:
            raise ValueError("the tail bucket needs the log-sum-exp of the student's other logits")
        logits = torch.cat([logits, _at_least_float32(logsumexp_rest).unsqueeze(-1)], dim=-1)
        return _tempered(logits, temperature, tail_entropy)
    return F.log_softmax(logits / temperature, dim=-1)


# Ranks whose terms of a Zipf sum are added one by one; beyond them the sum is the
# midpoint integral, whose relative error there is below b(b+1) / (24 (k + 64)**2).
_ZIPF_EXPLICIT_RANKS = 64
# The exponent is bisected in [0, this]; a tail far lighter than its last kept token
# needs b of a few hundred (k=64: about 600 for a tail of 1e-4 p_k), and beyond that
# the tail is one token anyway.
_ZIPF_MAX_EXPONENT = 1e4
_ZIPF_BISECTIONS = 64


def _log_zipf_sum(b: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """log sum_{r=first}^{last} r**-b for each exponent in ``b`` [N] (float64)."""
    split = min(last + 1, first + _ZIPF_EXPLICIT_RANKS)
    ranks = torch.arange(first, split, dtype=torch.float64, device=b.device).log()
    parts = [-b.unsqueeze(-1) * ranks]
    if split <= last:
        # integral of x**-b over [split - 1/2, last + 1/2] = A**s * expm1(s l) / s, s = 1 - b
        low = math.log(split - 0.5)
        span = math.log(last + 0.5) - low
        s = 1.0 - b
        tiny = s.abs() < 1e-12
        safe = torch.where(tiny, torch.ones_like(s), s)
        ratio = torch.where(tiny, torch.full_like(s, span), torch.expm1(s * span) / safe)
        parts.append((s * low + ratio.log()).unsqueeze(-1))
    return torch.cat(parts, dim=-1).logsumexp(dim=-1)


def zipf_tail_entropy(
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    vocab_size: int,
    temperature: float,
    empty: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Renyi entropy of order 1/T of the tail's shape, under Zipf's law, per position.

    ``topk_logprobs`` [N, k] and ``tail_logprob`` [N] as stored (raw T=1). The tail is
    assumed to be the ranks ``k+1 .. V`` with ``p_r = p_k (r / k)**-b``, continuing from
    the smallest kept probability ``p_k``, where ``b >= 0`` is the exponent that makes
    its mass ``exp(tail_logprob)``; a tail heavier than ``(V - k) p_k`` (possible only
    from quantization or the floors) is spread evenly (``b = 0``). Returns [N] float64
    ``H = (log S(b / T) - log S(b) / T) / (1 - 1/T)`` with ``S(b) = sum_r r**-b``: zero at
    T=1 (where it does not matter) and when the top-k covers the vocabulary. With
    ``empty`` [N, k] (adaptive k) a position's k is its number of slots that are not
    empty, and ``p_k`` the smallest of those.
    """
    k = topk_logprobs.shape[-1]
    tail_log = tail_logprob.double().clamp(min=TAIL_FLOOR)
    if temperature == 1.0 or k >= vocab_size:
        return torch.zeros_like(tail_log)
    values = topk_logprobs.double().clamp(min=TOPK_FLOOR)
    if empty is None:
        return _zipf_entropy(values.amin(dim=-1), tail_log, k, vocab_size, temperature)
    log_pk = values.masked_fill(empty, math.inf).amin(dim=-1)
    kept = (~empty).sum(dim=-1)
    out = torch.zeros_like(tail_log)
    # The ranks a tail starts at differ per position; there are at most k distinct ones.
    for n in kept.unique().tolist():
        rows = kept == n
        out[rows] = _zipf_entropy(log_pk[rows], tail_log[rows], n, vocab_size, temperature)
    return out


def _zipf_entropy(
    log_pk: torch.Tensor, tail_log: torch.Tensor, k: int, vocab_size: int, temperature: float
) -> torch.Tensor:
    """``zipf_tail_entropy`` for positions that all keep ``k`` entries, the smallest
    ``log_pk`` [N], with tails ``tail_log`` [N] (float64)."""
    if k >= vocab_size:
        return torch.zeros_like(tail_log)
    # log mass(b) = log p_k + b log k + log S(b) falls as b grows; bisect mass(b) = tail.
    low = torch.zeros_like(tail_log)
    high = torch.full_like(tail_log, _ZIPF_MAX_EXPONENT)
    for _ in range(_ZIPF_BISECTIONS):
        mid = 0.5 * (low + high)
        heavy = log_pk + mid * math.log(k) + _log_zipf_sum(mid, k + 1, vocab_size) > tail_log
        low, high = torch.where(heavy, mid, low), torch.where(heavy, high, mid)
    b = 0.5 * (low + high)
    inverse = 1.0 / temperature
    spread = _log_zipf_sum(b * inverse, k + 1, vocab_size) - inverse * _log_zipf_sum(
        b, k + 1, vocab_size
    )
    return spread / (1.0 - inverse)


def _plogp_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per outcome ``a * (log a - log b)``, with ``0 * anything = 0`` and no NaN gradients.

    Where ``a`` is zero both logs are replaced before subtracting, because ``-inf - -inf``
    is NaN and a NaN poisons the backward pass even in a branch ``where`` discards.
    """
    empty = torch.isneginf(log_a)
    safe_a = log_a.masked_fill(empty, 0.0)
    safe_b = log_b.masked_fill(empty, 0.0)
    return log_a.exp() * (safe_a - safe_b)


def forward_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum_i q_i (log q_i - log p_i), per position.

    ``teacher`` = log q, ``student`` = log p, both [N, K] over the same outcomes; returns
    [N]. Mode-covering: the student is pushed to put mass wherever the teacher does. This
    is Hinton et al.'s soft-target loss up to the teacher's entropy, which has no gradient.
    """
    return _plogp_ratio(teacher, student).sum(dim=-1)


def sampled_targets(draws: torch.Tensor, empty: torch.Tensor | None = None) -> torch.Tensor:
    """A sampled dataset's entries as ``sampled_cross_entropy``'s weights over the
    outcomes of ``student_log_probs`` with a bucket: ``draws`` [N, k] ``ln(c_i / N)``,
    -inf where ``empty`` [N, k] (padding); the bucket, last, has no draws (-inf).
    Returns [N, k+1]."""
    weights = _at_least_float32(draws)
    if empty is not None:
        weights = weights.masked_fill(empty, -math.inf)
    return torch.cat([weights, weights.new_full((weights.shape[0], 1), -math.inf)], dim=-1)


def sampled_cross_entropy(draws: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """RS-KD's estimate of the cross-entropy H(q, p) = -sum_x q(x) log p(x), per position.

    ``draws`` = log(c_i / N) for the N draws from the teacher ``q`` kept as distinct ids
    with counts ``c_i`` (-inf on slots without a draw), ``student`` = log p at the same
    ids (the student's full-vocabulary log-probs), both [N, K]. Returns [N]
    ``-sum_i (c_i / N) log p(x_i)`` (Anshumann et al. 2025, "Sparse Logit Sampling").
    Its expectation over the draws is H(q, p) exactly, so its gradient is an unbiased
    estimate of forward KL(q || p)'s (they differ by the teacher's entropy, constant in
    p). No log-probs of the teacher enter, so there is no temperature to apply to them:
    the draws come from the teacher at the temperature they were drawn at.
    """
    present = ~torch.isneginf(draws)
    return -(draws.exp() * student.masked_fill(~present, 0.0)).sum(dim=-1)


def reverse_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_i p_i (log p_i - log q_i), per position.

    Mode-seeking: the student is pushed off outcomes the teacher finds unlikely. Over a
    cached top-k this is an approximation (see the module docstring): outcomes outside
    the teacher's support are invisible (renormalize) or pooled (bucket).
    """
    return _plogp_ratio(student, teacher).sum(dim=-1)


def generalized_jsd(teacher: torch.Tensor, student: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence JSD(beta) of GKD (Agarwal et al. 2024).

    ``JSD(beta)(q || p) = beta KL(q || m) + (1 - beta) KL(p || m)`` with the mixture
    ``m = beta q + (1 - beta) p``. For small beta it is ``beta KL(q || p) + O(beta**2)``
    and for beta near 1 ``(1 - beta) KL(p || q) + O((1 - beta)**2)``, so its gradients
    point like forward and reverse KL at the two ends; at exactly 0 and 1 the formula
    vanishes, and those two values are defined as forward and reverse KL (as GKD and TRL
    do). Bounded by the binary entropy of beta. An approximation over a cached top-k,
    like reverse KL.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(teacher, student)
    if beta == 1.0:
        return reverse_kl(teacher, student)
    # An outcome empty on both sides (a repeated id, an empty tail) is left out of the
    # mixture's log-sum-exp, whose gradient would be NaN there.
    both_empty = torch.isneginf(teacher) & torch.isneginf(student)
    mixture = torch.logsumexp(
        torch.stack(
            [
                teacher.masked_fill(both_empty, 0.0) + math.log(beta),
                student.masked_fill(both_empty, 0.0) + math.log1p(-beta),
            ]
        ),
        dim=0,
    ).masked_fill(both_empty, -math.inf)
    return beta * _plogp_ratio(teacher, mixture).sum(dim=-1) + (1.0 - beta) * _plogp_ratio(
        student, mixture
    ).sum(dim=-1)


def total_variation(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Total variation distance TV(q, p) = 1/2 sum_i |q_i - p_i|, per position, in [0, 1].

    Symmetric and bounded, so a confidently wrong position costs at most 1 (Wen et al.
    2023, "f-Divergence Minimization for Sequence-Level Knowledge Distillation").
    """
    return 0.5 * (teacher.exp() - student.exp()).abs().sum(dim=-1)


def divergence(
    name: Divergence, teacher: torch.Tensor, student: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """Dispatch to the divergence called ``name``; ``beta`` is used by ``jsd`` only."""
    if name == "forward_kl":
        return forward_kl(teacher, student)
    if name == "reverse_kl":
        return reverse_kl(teacher, student)
    if name == "jsd":
        return generalized_jsd(teacher, student, beta)
    if name == "tvd":
        return total_variation(teacher, student)
    raise ValueError(f"unknown divergence {name!r}")


def combine(kd: torch.Tensor, ce: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """Per-position training loss ``(1 - alpha) * T**2 * D + alpha * CE`` (Hinton et al.).

    ``kd`` is the divergence D at temperature T, ``ce`` the hard-label cross-entropy
    ``-log p(y)`` of the token that came next, at T=1. T**2 keeps the soft term's gradient
    on the scale of the hard term's as T grows (the soft gradients shrink like 1/T**2).
    """
    return (1.0 - alpha) * temperature**2 * kd + alpha * ce


def union_teacher_log_probs(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    score_ids: torch.Tensor,
    score_logprobs: torch.Tensor,
    vocab_size: int,
    temperature: float,
    topk_empty: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The teacher on the union of its top-k and the student's ids, plus a tail bucket.

    ``topk_ids``/``topk_logprobs`` [N, k]: the teacher's top-k and its raw T=1 log-probs;
    ``score_ids``/``score_logprobs`` [N, s]: the ids the student chose and the teacher's
    exact log-probs there. Returns ``ids`` [N, k+s] (top-k first), ``empty`` [N, k+s]
    (True on the later slot of an id in both sets), the teacher's log-probs at T over
    the k+s slots and the bucket [N, k+s+1] (-inf on empty slots, and on the bucket where
    the union covers the vocabulary), and the tail's ``tail_entropy`` [N] for the student
    (None at T=1). The log-probs are floored like ``teacher_log_probs``'; the bucket's
    mass is what the union leaves, ``1 - sum_U q``. At T != 1 the bucket is softened as a
    Zipf tail continuing from the teacher's top-k (``zipf_tail_entropy`` over the V - s
    ranks the student's ids do not take). ``topk_empty`` [N, k]: the top-k slots that are
    adaptive-k padding (a repeat of a kept id, so the union empties them); the Zipf tail
    then continues from each position's own kept entries.
    """
    ids = torch.cat([topk_ids, score_ids], dim=-1)
    raw = torch.cat([topk_logprobs, score_logprobs], dim=-1)
    ordered, order = ids.sort(dim=-1, stable=True)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    empty = torch.zeros_like(repeat).scatter(1, order, repeat)
    values = raw.double().clamp(min=TOPK_FLOOR).masked_fill(empty, -math.inf)
    kept = values.logsumexp(dim=-1).clamp(max=0.0)
    rest = torch.log(-torch.expm1(kept)).clamp(min=TAIL_FLOOR)
    covered = (~empty).sum(dim=-1) >= vocab_size
    rest = rest.masked_fill(covered, -math.inf)
    tail_entropy = None
    if temperature != 1.0:
        tail_entropy = zipf_tail_entropy(
            topk_logprobs, rest, vocab_size - score_ids.shape[-1], temperature, topk_empty
        )
    outcomes = torch.cat([values, rest.unsqueeze(-1)], dim=-1)
    teacher = _tempered(outcomes, temperature, tail_entropy)
    return ids, empty, teacher.to(torch.promote_types(raw.dtype, torch.float32)), tail_entropy
