"""The cross-tokenizer loss: chunk distributions compared through a vocabulary map.

A span-aligned hybrid of Universal Logit Distillation (Boizard et al. 2024, "Towards
Cross-Tokenizer Distillation: the Universal Logit Distillation Loss"), the hybrid of
matched and unmatched vocabulary used by TRL's GOLD, and Approximate Likelihood Matching
(Minixhofer et al. 2025). ``aligned_data`` cuts each completion into chunks (the same
bytes on both sides, teacher tokens i..i', student tokens j..j') and says which of the
teacher's top-k outcomes at i match which student id. Per chunk, with ``L`` a side's
summed log-probs of its observed tokens after the chunk's first one:

- chunk distribution: ``log r(v) = log p(v | x<first) + L``, for the teacher on its
  cached top-k (``L_T`` from the cached ``token_logprob``), for the student from its live
  logits (``L_S``, differentiable). For the observed first token, ``r`` is the
  probability of the chunk's whole text.
- matched part: the outcomes are the matched ids plus one bucket holding everything else,
  ``1 - sum_matched r`` (the tail, the unmatched ids, and the mass whose continuation
  leaves the chunk's text): ``bucket = logaddexp(log rest, log(1 - e^L) + log sum_M p)``.
  Both sides then go through ``losses.teacher_log_probs`` / ``student_log_probs`` (the
  temperature) and the trainer's own divergence (forward/reverse KL, JSD(beta), TVD).
  ``--tail renormalize`` drops the bucket, as it does for one tokenizer.
- unmatched part: ULD's L1 distance between the sorted chunk probabilities of the
  teacher's unmatched top-k and the student's k most likely ids outside the map's image
  (the student tokens no teacher token spells, e.g. its multi-digit numbers).
- weight: ``w`` = the teacher's matched share of its top-k mass at the chunk's first
  position; the chunk's divergence is ``T^2 w D + (1 - w) L1``.
- ALM term (``alm_weight``): per chunk, the binary KL between Bernoulli(teacher's
  probability of the chunk's text) and Bernoulli(the student's), ALM's binarised
  f-divergence on chunk likelihoods.
- hard labels: ``alpha`` times the student's CE on its own tokens of the text.
- on-policy ``score_ids`` (``onpolicy_cross``): at a 1:1 chunk, the student's own top ids
  that have a teacher counterpart come with the teacher's exact log-probs; they join the
  matched outcomes (an id already among the matched top-k is not counted twice) and
  their mass leaves the teacher's tail, as ``union_head_loss`` does for one tokenizer.
  The unmatched part still compares the teacher's top-k only.

The training loss is ``(1 - alpha)(T^2 w D + (1 - w) L1) + alm_weight * ALM`` per chunk
plus ``alpha`` CE per student token, summed, normalized by the loop per student token.
With one tokenizer on both sides every chunk is 1:1, the map is the identity, ``L = 0``,
``w = 1`` and nothing is unmatched, so this is exactly ``sparse_kd``'s loss (a test
checks values and gradients).

It runs in the same chunked head as ``sparse_kd``: one [c, vocab] float32 buffer per
head chunk, the gradient of the loss written into it, never a [B, T, V] tensor. Head
chunks are cut only between alignment chunks, so every alignment chunk's continuation
sits in one head chunk. Autograd runs on a few numbers per position (the logits at the
label, the matched ids and the unmatched picks; the log-normalizer; the log-mass off the
matched ids); the vocabulary-wide part of the gradient is then written by hand, as in
``sparse_kd.head_chunk``. Choosing the k unmatched student ids reads extra copies of the
first rows' buffers, in blocks of ``_PICK_ROWS`` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .losses import (
    TAIL_FLOOR,
    divergence,
    student_log_probs,
    teacher_log_probs,
    zipf_tail_entropy,
)
from .sparse_kd import ChunkedHead, LossSpec
from .token_alignment import VocabMap

# Log-prob given to an outcome absent from a row (unmatched ids in the matched part).
# exp() of it is exactly 0 in float32 and float64 and it stays finite, so every
# divergence gets zero value and zero gradient from it without NaN-prone infinities.
ABSENT = -1e4
# First rows whose buffers are copied at once to pick their unmatched student ids.
_PICK_ROWS = 64


@dataclass(frozen=True)
class CrossSpec:
    """The cross-tokenizer loss: ``LossSpec`` plus the ALM weight and the map's image.

    ``student_mapped`` [vocab] marks the student ids some teacher id maps to.
    """

    loss: LossSpec
    student_mapped: torch.Tensor
    alm_weight: float = 0.0


def cross_spec(loss: LossSpec, vocab_map: VocabMap, alm_weight: float = 0.0) -> CrossSpec:
    """The ``CrossSpec`` of a student with ``loss.vocab_size`` tokens and this map."""
    mapped = torch.zeros(loss.vocab_size, dtype=torch.bool)
    known = min(loss.vocab_size, len(vocab_map.student_mapped))
    mapped[:known] = torch.from_numpy(vocab_map.student_mapped[:known].copy())
    return CrossSpec(loss, mapped, alm_weight)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0 (Maechler's two branches); -inf at x = 0 is avoided by callers."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _bucket(log_rest: torch.Tensor, log_matched: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    """log of the chunk mass off the matched ids: rest + (1 - e^L) * matched mass.

    At L = 0 (a one-token continuation) it is ``log_rest`` exactly, with no gradient
    through the (infinite) log(1 - e^L).
    """
    inside = cont < 0
    safe = torch.where(inside, cont, torch.full_like(cont, -1.0))
    leaving = _log1mexp(safe) + log_matched
    return torch.where(inside, torch.logaddexp(log_rest, leaving), log_rest)


def _segment_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, index, values)


def _binary_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(Bern(e^log_p) || Bern(e^log_q)), both log-probs <= 0."""
    log_p = log_p.clamp(max=-1e-7)
    log_q = log_q.clamp(max=-1e-7)
    p = log_p.exp()
    return p * (log_p - log_q) + (1 - p) * (_log1mexp(log_p) - _log1mexp(log_q))


@dataclass
class ChunkTargets:
    """The teacher's side of the head chunk's alignment chunks, [M] or [M, k] each."""

    first: torch.Tensor  # head-chunk row of each alignment chunk's first position
    member: torch.Tensor  # per row: its alignment chunk (only valid where aligned)
    aligned: torch.Tensor  # per row
    ids: torch.Tensor  # [M, k] student ids, -1 unmatched
    teacher: torch.Tensor  # [M, k] raw teacher log-probs
    tail: torch.Tensor  # [M]
    observed: torch.Tensor  # [M] teacher log-prob of its observed first token
    rest: torch.Tensor  # [M] L_T
    # On-policy only: [M, s] student ids the teacher rated exactly (-1 none), and its
    # raw log-probs there; None: s = 0.
    score_ids: torch.Tensor | None = None
    score_teacher: torch.Tensor | None = None


def cross_head_chunk(
    logits: torch.Tensor,
    labels: torch.Tensor,
    targets: ChunkTargets,
    spec: CrossSpec,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(summed loss, summed chunk divergence, summed CE) of one head chunk, and the
    gradient of the summed loss w.r.t. ``logits`` [c, vocab] (written into it in place)."""
    base = spec.loss
    sft = base.loss == "sft"
    alpha = 1.0 if sft else base.alpha
    t = targets
    vocab = logits.shape[1]
    n_chunks, k = t.ids.shape
    score_ids, score_teacher = t.score_ids, t.score_teacher
    if score_ids is None:
        score_ids, score_teacher = t.ids[:, :0], t.teacher[:, :0]
    # score_ids join the top-k as more columns; one already matched in its row is dropped.
    repeat = (score_ids.unsqueeze(2) == t.ids.unsqueeze(1)).any(-1)
    extra = (score_ids >= 0) & ~repeat
    columns = torch.cat([t.ids, torch.where(extra, score_ids, -1)], dim=1)
    teacher_lp = torch.cat([t.teacher, torch.where(extra, score_teacher, -torch.inf)], dim=1)
    matched = columns >= 0
    safe_ids = columns.clamp(min=0)
    label_logits = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    top_logits = logits[t.first].gather(1, safe_ids)
    peak = logits.amax(dim=-1, keepdim=True)
    exp = logits.sub_(peak).exp_()
    peak = peak.squeeze(1)
    # Matched entries of the first rows are zeroed so that row sums give the rest mass.
    top_exp = exp[t.first].gather(1, safe_ids) * matched
    flat = (t.first.unsqueeze(1) * vocab + safe_ids)[matched]
    exp.view(-1).index_fill_(0, flat, 0.0)
    row_sum = exp.sum(dim=-1)
    total = row_sum.index_add(0, t.first, top_exp.sum(dim=-1))
    rest = row_sum[t.first].clamp_min(torch.finfo(torch.float32).tiny)

    weight_t = torch.where(matched, teacher_lp.exp(), torch.zeros_like(teacher_lp))
    w = weight_t.sum(-1) / teacher_lp.exp().sum(-1).clamp_min(1e-30)
    needs_picks = w < 1.0 if not sft else torch.zeros_like(w, dtype=torch.bool)
    picks = torch.zeros((n_chunks, k), dtype=torch.long, device=logits.device)
    pick_exp = torch.zeros((n_chunks, k), dtype=logits.dtype, device=logits.device)
    todo = torch.nonzero(needs_picks).squeeze(1)
    for start in range(0, len(todo), _PICK_ROWS):
        block = todo[start : start + _PICK_ROWS]
        candidates = exp[t.first[block]]
        candidates.masked_fill_(spec.student_mapped.unsqueeze(0), 0.0)
        values, ids = candidates.topk(min(k, vocab), dim=-1)
        picks[block, : ids.shape[1]] = ids
        pick_exp[block, : ids.shape[1]] = values

    with torch.enable_grad():
        z_label = label_logits.detach().requires_grad_(want_grad)
        lse = (peak + total.log()).detach().requires_grad_(want_grad)
        z_top = top_logits.detach().requires_grad_(want_grad)
        lse_rest = (peak[t.first] + rest.log()).detach().requires_grad_(want_grad)
        z_pick = (peak[t.first].unsqueeze(1) + pick_exp.log()).detach().requires_grad_(want_grad)
        leaves = [z_label, lse, z_top, lse_rest, z_pick]

        log_label = z_label - lse
        ce = -log_label
        soft = torch.zeros((), dtype=torch.float32, device=logits.device)
        kd = torch.zeros(n_chunks, dtype=torch.float32, device=logits.device)
        if not sft and n_chunks:
            inner = t.aligned.clone()
            inner[t.first] = False
            rows_idx = torch.nonzero(inner).squeeze(1)
            cont_s = _segment_sum(log_label[rows_idx], t.member[rows_idx], n_chunks)
            cont_t = t.rest
            lse_first = lse[t.first]
            s_matched = torch.where(matched, z_top - lse_first.unsqueeze(1), ABSENT)
            t_matched = torch.where(matched, teacher_lp, ABSENT)
            tail_mode = base.tail_for(k)
            tail = t.tail
            if extra.any():
                # The tail held the score_ids' mass; what stays is floored as a tail is.
                taken = torch.where(extra, score_teacher, -torch.inf).logsumexp(-1)
                left = t.tail.exp() - taken.exp()
                tail = torch.where(
                    taken > -torch.inf, left.clamp_min(math.exp(TAIL_FLOOR)).log(), t.tail
                )
            if tail_mode == "bucket":
                s_bucket = _bucket(lse_rest - lse_first, torch.logsumexp(s_matched, -1), cont_s)
                t_unmatched = torch.where(matched, -torch.inf, teacher_lp)
                t_rest = torch.logaddexp(torch.logsumexp(t_unmatched, -1), tail.clamp(min=-1e30))
                t_bucket = _bucket(t_rest, torch.logsumexp(t_matched, -1), cont_t)
            else:
                s_bucket = t_bucket = None
            # At T != 1 the bucket is softened as sparse_kd softens its tail: as a Zipf tail
            # continuing the teacher's top-k at the chunk's first position (over the ranks
            # the score_ids do not take, as union_head_loss does).
            spread = None
            if tail_mode == "bucket" and base.temperature != 1.0:
                ranks = base.vocab_size - score_ids.shape[1]
                spread = zipf_tail_entropy(t.teacher, tail, ranks, base.temperature)
            student = student_log_probs(
                s_matched + cont_s.unsqueeze(1), s_bucket, base.temperature, tail_mode, spread
            )
            teacher = teacher_log_probs(
                t_matched + cont_t.unsqueeze(1), t_bucket, base.temperature, tail_mode, spread
            )
            if tail_mode == "renormalize":
                # Chunks with nothing matched have no matched distribution to compare.
                has = matched.any(-1)
                student = torch.where(has.unsqueeze(1), student, 0.0)
                teacher = torch.where(has.unsqueeze(1), teacher, 0.0)
            matched_div = divergence(base.loss, teacher, student, base.beta)
            q_unmatched = torch.where(matched[:, :k], 0.0, (t.teacher + cont_t.unsqueeze(1)).exp())
            q_sorted = q_unmatched.sort(dim=-1, descending=True).values
            p_unmatched = (z_pick - lse_first.unsqueeze(1) + cont_s.unsqueeze(1)).exp()
            p_unmatched = torch.where(needs_picks.unsqueeze(1), p_unmatched, 0.0)
            uld = (q_sorted - p_unmatched).abs().sum(-1)
            # Reported as sparse_kd reports its divergence: before the T^2 factor.
            kd = w * matched_div + (1.0 - w) * uld
            soft = (1.0 - alpha) * (base.temperature**2 * w * matched_div + (1.0 - w) * uld).sum()
            if spec.alm_weight > 0:
                log_s = log_label[t.first] + cont_s
                soft = soft + spec.alm_weight * _binary_kl(t.observed + cont_t, log_s).sum()
        total_loss = soft + alpha * ce.sum()
        if want_grad:
            grads = torch.autograd.grad(total_loss, leaves, allow_unused=True)
    kd_sum, ce_sum = kd.detach().sum(), ce.detach().sum()
    loss = total_loss.detach()
    if not want_grad:
        return loss, kd_sum, ce_sum, None
    g_label, g_lse, g_top, g_rest, g_pick = (
        torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)
    )
    coefficient = g_lse / total
    coefficient = coefficient.index_add(0, t.first, g_rest / rest)
    grad = exp.mul_(coefficient.unsqueeze(1))
    # Matched entries were zeroed above: their softmax share is added back here.
    matched_grad = g_top + top_exp * (g_lse[t.first] / total[t.first]).unsqueeze(1)
    grad.view(-1).index_add_(0, flat, matched_grad[matched])
    grad.scatter_add_(1, labels.unsqueeze(1), g_label.unsqueeze(1))
    pick_flat = (t.first.unsqueeze(1) * vocab + picks)[needs_picks]
    grad.view(-1).index_add_(0, pick_flat.reshape(-1), g_pick[needs_picks].reshape(-1))
    return loss, kd_sum, ce_sum, grad


def head_cuts(chunk_first: torch.Tensor, aligned: torch.Tensor, chunk_size: int) -> list[int]:
    """Head-chunk boundaries near multiples of ``chunk_size`` that never split an
    alignment chunk: a cut goes before a chunk's first position or an unaligned one."""
    n = int(chunk_first.shape[0])
    allowed = (chunk_first | ~aligned).cpu().numpy()
    cuts, last = [0], 0
    for position in range(1, n):
        if position - last >= chunk_size and allowed[position]:
            cuts.append(position)
            last = position
    cuts.append(n)
    return cuts


def _targets(batch_slice: dict[str, torch.Tensor]) -> ChunkTargets:
    first_mask = batch_slice["chunk_first"]
    first = torch.nonzero(first_mask).squeeze(1)
    member = (first_mask.long().cumsum(0) - 1).clamp(min=0)
    return ChunkTargets(
        first=first,
        member=torch.where(batch_slice["aligned"], member, 0),
        aligned=batch_slice["aligned"],
        ids=batch_slice["topk_ids"][first],
        teacher=batch_slice["topk_logprobs"][first].float(),
        tail=batch_slice["tail_logprob"][first].float(),
        observed=batch_slice["teacher_logprob"][first].float(),
        rest=batch_slice["teacher_rest"][first].float(),
        score_ids=batch_slice["score_ids"][first],
        score_teacher=batch_slice["score_logprobs"][first].float(),
    )


ALIGNMENT_FIELDS = (
    "chunk_first",
    "aligned",
    "topk_ids",
    "topk_logprobs",
    "tail_logprob",
    "teacher_logprob",
    "teacher_rest",
    "score_ids",
    "score_logprobs",
)


def cross_head_loss(
    hidden: torch.Tensor, weight: torch.Tensor, batch, spec: CrossSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-tokenizer loss over a batch's N student target positions, and
    [chunk divergence sum, CE sum]. ``batch`` is an ``aligned_data.AlignedBatch``;
    ``hidden`` [N, H] the student's final hidden states at its target positions."""
    alignment = {name: getattr(batch, name) for name in ALIGNMENT_FIELDS}
    labels = batch.labels

    def score(logits, start, end, want_grad):
        part = {name: value[start:end] for name, value in alignment.items()}
        return cross_head_chunk(
            logits, labels[start:end], _targets(part), spec, want_grad=want_grad
        )

    cuts = head_cuts(alignment["chunk_first"], alignment["aligned"], spec.loss.chunk_size)
    spans = list(zip(cuts[:-1], cuts[1:], strict=True))
    return ChunkedHead.apply(hidden, weight, spec.loss.vocab_size, spans, score)
