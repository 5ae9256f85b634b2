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

Temperature (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network") acts on
the outcomes of the tail mode, on both sides alike: each side's T=1 log-probs over those
outcomes are divided by T and renormalized, ``softmax(log r / T)``, and the divergence is
multiplied by T**2 so its gradients keep their size as T changes. For ``renormalize`` that
is the usual tempered softmax restricted to ``S``. For ``bucket`` the pooled tail is
tempered as one outcome, which differs from pooling the tempered vocabulary (the cache
cannot do that: it does not know the tail's shape); both sides get the same treatment, so
the divergence still vanishes exactly when they agree.

Reverse KL and JSD over a cached top-k are approximations whatever the tail mode: the
cache cannot say how the teacher rates tokens outside its top-k that the student puts
mass on, which these divergences weigh by the student's probability. The on-policy path
(live teacher, GKD; Agarwal et al. 2024) scores the student's own tokens instead.
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


def teacher_log_probs(
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    temperature: float,
    tail: TailMode,
) -> torch.Tensor:
    """The teacher's log-probs at temperature T over the tail mode's outcomes.

    ``topk_logprobs`` [N, k] raw T=1 log-probs, ``tail_logprob`` [N] log of the mass
    outside the top-k, floored at ``TOPK_FLOOR`` and ``TAIL_FLOOR``. Returns [N, k] (renormalize) or
    [N, k+1] (bucket, tail last): ``log q = log_softmax(t / T)`` over the k (or k+1)
    outcomes, which also repairs a stored top-k whose quantized probabilities do not sum
    with the tail to exactly one.
    """
    logits = _at_least_float32(topk_logprobs).clamp(min=TOPK_FLOOR)
    if tail == "bucket":
        floored = _at_least_float32(tail_logprob).clamp(min=TAIL_FLOOR)
        logits = torch.cat([logits, floored.unsqueeze(-1)], dim=-1)
    return F.log_softmax(logits / temperature, dim=-1)


def student_log_probs(
    topk_logits: torch.Tensor,
    logsumexp_rest: torch.Tensor | None,
    temperature: float,
    tail: TailMode,
) -> torch.Tensor:
    """The student's log-probs at temperature T over the same outcomes as the teacher's.

    ``topk_logits`` [N, k]: the student's raw logits ``z`` at the teacher's top-k ids.
    For ``bucket``, ``logsumexp_rest`` [N] is ``lse(z)`` over the ids outside the top-k,
    the logit of the pooled tail, and the result is ``log_softmax([z_S, lse_rest] / T)``
    [N, k+1]; for ``renormalize`` it is ``log_softmax(z_S / T)`` [N, k] (and
    ``logsumexp_rest`` is unused). The student's normalizer cancels out of both.
    """
    logits = _at_least_float32(topk_logits)
    if tail == "bucket":
        if logsumexp_rest is None:
            raise ValueError("the tail bucket needs the log-sum-exp of the student's other logits")
        logits = torch.cat([logits, _at_least_float32(logsumexp_rest).unsqueeze(-1)], dim=-1)
    return F.log_softmax(logits / temperature, dim=-1)


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
    mixture = torch.logsumexp(
        torch.stack([teacher + math.log(beta), student + math.log1p(-beta)]), dim=0
    )
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
