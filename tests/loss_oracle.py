"""A float64 dense oracle for the sparse losses, written apart from trainer/losses.py.

It works on full-vocabulary probabilities in numpy/torch float64, with explicit sums over
every token: it pools the mass off the teacher's top-k into one outcome, floors the
teacher's top-k probabilities at float32's smallest normal number and its pooled tail at
float32 epsilon (the resolutions the cache captures them at), softens each outcome by
raising its probability to 1/T, and applies the textbook divergence. The pooled tail is
softened token by token, as the tail the trainer assumes: Zipf's law from the last kept
probability, ``pi_r = p_k (r / k)**-b`` for ranks k+1..V, with b found here by bisection
on the explicit sum; the student's pooled tail is spread in the teacher's proportions.
"""

from __future__ import annotations

import numpy as np
import torch

EPS = 2.0**-23  # float32 epsilon: the teacher's tail is known to this resolution
TINY = 2.0**-126  # float32's smallest normal number: a top-k probability is known to this


def divergence(name, q, p, beta=0.5):
    """Textbook divergences between probability tensors [N, K]; 0 log 0 = 0."""

    def kl(a, b):
        return torch.where(a > 0, a * (a / b).log(), torch.zeros_like(a)).sum(-1)

    if name == "forward_kl":
        return kl(q, p)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return kl(p, q)
    if name == "jsd" and beta == 0.0:
        return kl(q, p)
    if name == "jsd":
        m = beta * q + (1 - beta) * p
        return beta * kl(q, m) + (1 - beta) * kl(p, m)
    return 0.5 * (q - p).abs().sum(-1)


def pooled(probs, ids):
    """[N, V] probabilities -> [N, k + 1]: the top-k ids, then everything else pooled."""
    off = torch.ones_like(probs, dtype=torch.bool).scatter(1, ids, False)
    return torch.cat([probs.gather(1, ids), (probs * off).sum(-1, keepdim=True)], -1)


def floored(teacher_pooled):
    """The teacher's pooled outcomes with the cache's floors applied."""
    floor = torch.full_like(teacher_pooled, TINY)
    floor[:, -1] = EPS
    return torch.maximum(teacher_pooled, floor)


def zipf_shape(kept, tail_mass, vocab):
    """[N, V - k] proportions of the tail tokens under the Zipf assumption (float64).

    ``kept`` [N, k] the teacher's (floored) top-k probabilities, ``tail_mass`` [N].
    """
    kept = np.asarray(kept, dtype=np.float64)
    tail_mass = np.asarray(tail_mass, dtype=np.float64)
    k = kept.shape[1]
    ranks = np.arange(k + 1, vocab + 1, dtype=np.float64)
    shapes = []
    for p_k, m in zip(kept.min(axis=1), tail_mass, strict=True):

        def mass(b, p_k=p_k):
            return (p_k * (ranks / k) ** -b).sum()

        low, high = 0.0, 1e4 if mass(0.0) > m else 0.0
        for _ in range(200):
            mid = (low + high) / 2
            low, high = (mid, high) if mass(mid) > m else (low, mid)
        tokens = (ranks / k) ** -((low + high) / 2)
        shapes.append(tokens / tokens.sum())
    return torch.from_numpy(np.stack(shapes))


def soften(outcomes, temperature, tail_shape=None):
    """[N, K] probabilities softened: each to the power 1/T, renormalized.

    With ``tail_shape`` [N, V - k] the last outcome is a pooled tail softened token by
    token, its mass spread in those proportions.
    """
    powered = outcomes ** (1.0 / temperature)
    if tail_shape is not None:
        tail = ((outcomes[:, -1:] * tail_shape) ** (1.0 / temperature)).sum(-1)
        powered = torch.cat([powered[:, :-1], tail.unsqueeze(-1)], -1)
    return powered / powered.sum(-1, keepdim=True)


def bucket_pair(teacher_probs, student_probs, ids, temperature):
    """Teacher and student softened on the top-k plus the tail bucket, the tails Zipf."""
    q = floored(pooled(teacher_probs, ids))
    p = pooled(student_probs, ids)
    vocab, k = teacher_probs.shape[1], ids.shape[1]
    shape = None
    if temperature != 1.0 and k < vocab:
        shape = zipf_shape(q[:, :-1].numpy(), q[:, -1].numpy(), vocab)
    return soften(q, temperature, shape), soften(p, temperature, shape)
