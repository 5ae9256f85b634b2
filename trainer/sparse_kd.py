"""The student's output head, run in chunks along the sequence: where the memory goes.

Naive KD builds the student's logits for every position ([batch, seq, vocab], 2.5 GB in
float32 at 4 x 1024 x 151,936), their log-softmax, a dense teacher tensor of the same
size, and keeps most of them for the backward pass. Here the head takes the final hidden
states of only the positions that have a target ([N, hidden]) and walks them in chunks of
``chunk_size`` positions. For each chunk it computes the logits, the loss, and at once
the loss's gradient with respect to the chunk's hidden states and the head's weight (the
same idea as Liger's fused linear cross-entropy), then drops the chunk. Nothing of size
[N, vocab] ever exists; a chunk holds one [chunk, vocab] float32 buffer (plus its bf16
copy under autocast). The backward pass only scales the stored gradients by the incoming
one, so there is no recomputation and the time stays that of plain cross-entropy
training: three matmuls per position.

The teacher side is never densified either: its top-k ids index the student's logits.
A sampled dataset (RS-KD draws, ``LossSpec.sampled``) runs the same head: the distinct
drawn ids take the top-k's place, and the divergence is ``losses.sampled_cross_entropy``
of the counts against the student's exact full-vocabulary log-probs at those ids (the
pooled bucket holds the rest of the student's mass and gets no weight).
The on-policy loss (``union_head_loss``) runs the same head on the union of the
teacher's top-k and the student's own ids; a repeated id is an empty slot there, so the
gradients are scatter-added, and the union may cover the vocabulary (empty tail).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .config import LossName, TailMode
from .losses import (
    combine,
    divergence,
    sampled_cross_entropy,
    sampled_targets,
    student_log_probs,
    teacher_log_probs,
    union_teacher_log_probs,
    zipf_tail_entropy,
)


@dataclass(frozen=True)
class LossSpec:
    """Which loss to compute and how the head is chunked.

    ``vocab_size`` is the tokenizer's vocabulary: logit rows past it are padding (Qwen pads
    151,665 tokens to 151,936 or 152,064 rows) and never take part in a softmax.
    """

    vocab_size: int
    loss: LossName = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    alpha: float = 0.0
    tail: TailMode = "bucket"
    chunk_size: int = 512
    # The teacher's entries are draws (ln(count / N)), not top-k log-probs: the loss is
    # RS-KD's estimator (forward KL only, student at T=1; see ``chunked_head_loss``).
    sampled: bool = False

    def tail_for(self, k: int) -> TailMode:
        """The tail mode actually used: a top-k that covers the vocabulary leaves no tail."""
        return "renormalize" if k >= self.vocab_size else self.tail


def head_chunk(
    logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor | None,
    teacher: torch.Tensor | None,
    spec: LossSpec,
    want_grad: bool,
    tail_entropy: torch.Tensor | None = None,
    empty: torch.Tensor | None = None,
    tail: TailMode | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-position (loss, divergence, CE) of one chunk, and d(sum of loss)/d(logits).

    ``logits`` [c, vocab] float32 is consumed: it is overwritten in place and becomes
    the returned gradient, so a chunk costs one [c, vocab] buffer. ``labels`` [c] are the
    tokens that came next; ``topk_ids`` [c, k] and ``teacher`` (``teacher_log_probs``)
    the teacher's sparse distribution, None for ``sft``; ``tail_entropy`` [c] the
    teacher's (``zipf_tail_entropy``), which softens the student's tail alike.
    ``empty`` [c, k] marks slots that carry no outcome (an id repeated from an earlier
    slot, in the on-policy union; the teacher is -inf there); ``tail`` overrides
    ``spec.tail_for(k)``, for a union whose width says nothing of what it covers.

    The divergence only sees the student through its logits at the top-k, ``z_S``, and
    (tail bucket) the log-sum-exp of the others, ``r``; it runs through the pure
    functions of ``losses`` with autograd on those [c, k+1] numbers. The vocabulary-wide
    part of the gradient is then written by hand, because it is simple and is where the
    memory and time go: ``dr/dz_j = exp(z_j - r)`` off the top-k, and the hard-label CE
    adds ``alpha * (softmax(z) - onehot(y))``. Passes over the [c, vocab] buffer: max,
    subtract, exp, sum, scale, as many as a fused cross-entropy makes. ``r`` is summed
    relative to the largest logit off the top-k, so it is exact however sure the student.
    """
    sft = spec.loss == "sft"
    alpha = 1.0 if sft else spec.alpha
    if not sft and (topk_ids is None or teacher is None):
        raise ValueError(f"loss {spec.loss!r} needs the teacher's top-k; use 'sft' without it")
    label_logits = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    if sft:
        shift = logits.amax(dim=-1)
        peak = shift
    else:
        top_logits = logits.gather(1, topk_ids)
        # The logits off the top-k are exponentiated relative to their own maximum, not
        # the global one: a student sure of a top-k token (a gap of hundreds of nats)
        # would otherwise underflow every one of them, and the tail bucket's log-mass
        # with them. Without ids off the top-k (k covers the vocabulary) there is no tail.
        logits.scatter_(1, topk_ids, float("-inf"))
        rest_max = logits.amax(dim=-1)
        top_max = top_logits.amax(dim=-1)
        shift = torch.where(torch.isneginf(rest_max), top_max, rest_max)
        peak = torch.maximum(shift, top_max)
    # From here on the buffer holds exp(z - shift), off the top-k only (zero on it).
    exp = logits.sub_(shift.unsqueeze(1)).exp_()
    rest = exp.sum(dim=-1)
    if sft:
        total = rest
    else:
        # Sums relative to the global maximum, for the softmax of the hard-label term.
        rest_scale = (shift - peak).exp()
        top_exp = (top_logits - peak.unsqueeze(1)).exp()
        if empty is not None:
            top_exp = top_exp.masked_fill(empty, 0.0)
        total = rest * rest_scale + top_exp.sum(dim=-1)
    ce = peak + total.log() - label_logits
    if sft:
        kd = torch.zeros_like(ce)
        soft = kd
    else:
        tail = tail or spec.tail_for(topk_ids.shape[-1])
        with torch.enable_grad():
            top = top_logits.detach().requires_grad_(want_grad)
            rest_lse = (shift + rest.log()).requires_grad_(want_grad) if tail == "bucket" else None
            outcomes = top if empty is None else top.masked_fill(empty, float("-inf"))
            student = student_log_probs(outcomes, rest_lse, spec.temperature, tail, tail_entropy)
            if spec.sampled:
                kd = sampled_cross_entropy(teacher, student)
            else:
                kd = divergence(spec.loss, teacher, student, spec.beta)
            # The soft term only; the CE term's gradient is written by hand below.
            soft = combine(kd, torch.zeros_like(kd), spec.temperature, alpha)
            if want_grad:
                leaves = [top] if rest_lse is None else [top, rest_lse]
                grads = torch.autograd.grad(soft.sum(), leaves)
        kd, soft = kd.detach(), soft.detach()
    loss = soft + alpha * ce
    if not want_grad:
        return loss, kd, ce, None
    # Off the top-k: alpha softmax(z)_j = exp(z_j - shift) * alpha exp(shift - peak) / total,
    # and d(rest_lse)/dz_j = exp(z_j - shift) / rest, where rest >= 1 (its maximum's term).
    coefficient = alpha / total if sft else alpha * rest_scale / total
    if not sft and tail == "bucket":
        # rest = 0 only when the ids cover the vocabulary: no tail and nothing to scale.
        coefficient = coefficient + torch.where(rest > 0, grads[1] / rest, 0.0)
    grad = exp.mul_(coefficient.unsqueeze(1))
    if not sft:
        # Added, not written: a repeated id (empty slot, zero gradient) must not overwrite
        # its first slot. The buffer is zero on the ids.
        grad.scatter_add_(1, topk_ids, grads[0] + top_exp * (alpha / total).unsqueeze(1))
    if alpha > 0.0:
        grad.scatter_add_(1, labels.unsqueeze(1), torch.full_like(ce, -alpha).unsqueeze(1))
    return loss, kd, ce, grad


def unpadded(topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ids a gather can take, and the empty slots: the padding of adaptive-k positions.

    A dataset with adaptive k pads each position's entries to k with id -1
    (``shared.reader.PAD_ID``) and log-prob -inf. The padding becomes a repeat of the
    position's largest id marked empty, which ``head_chunk`` already handles (the
    on-policy union's repeated ids): no outcome on either side and zero gradient. Returns
    ``(topk_ids, None)`` when nothing is padded.
    """
    empty = topk_ids < 0
    if not bool(empty.any()):
        return topk_ids, None
    return torch.where(empty, topk_ids.amax(dim=-1, keepdim=True), topk_ids), empty


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when autocast is on for the device, else the hidden
    states' own. Softmaxes and the weight's gradient stay in float32 either way."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class ChunkedHead(torch.autograd.Function):
    """The sum of a loss over the rows of ``hidden`` through the output head, span by span.

    ``spans`` are (start, end) row ranges; for each, the span's logits are made and handed
    to ``score(logits, start, end, want_grad)``, which returns the span's (loss, kd, ce)
    sums and d loss / d logits. That gradient is folded into the hidden and head gradients
    at once and the logits dropped, so no [N, V] tensor is ever held. Both the sparse KD
    loss here and the cross-tokenizer loss (cross_tokenizer.py) run through this.
    """

    @staticmethod
    def forward(ctx, hidden, weight, vocab, spans, score):
        dtype = _compute_dtype(hidden)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        totals = torch.zeros(3, dtype=torch.float64, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            head = weight[:vocab].to(dtype)
            for start, end in spans:
                h = hidden[start:end].to(dtype)
                logits = (h @ head.T).float()
                loss, kd, ce, grad_logits = score(logits, start, end, need_h or need_w)
                if grad_logits is not None:
                    grad_logits = grad_logits.to(dtype)
                    if need_h:
                        grad_h[start:end] = grad_logits @ head
                    if need_w and dtype == torch.float32:
                        grad_w[:vocab].addmm_(grad_logits.T, h)
                    elif need_w:
                        grad_w[:vocab] += grad_logits.T @ h
                totals += torch.stack([loss, kd, ce]).double()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        stats = totals[1:].float()
        ctx.mark_non_differentiable(stats)
        return totals[0].float(), stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        grad_h, grad_w = ctx.saved_tensors
        # The stored gradients are scaled in place: this graph is backpropagated once.
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def _sparse_head(hidden, weight, labels, topk_ids, teacher, tail_entropy, empty, tail, spec):
    """``ChunkedHead`` with ``head_chunk`` scoring fixed spans of ``spec.chunk_size`` rows."""

    def part(values, start, end):
        return None if values is None else values[start:end]

    def score(logits, start, end, want_grad):
        loss, kd, ce, grad_logits = head_chunk(
            logits,
            labels[start:end],
            part(topk_ids, start, end),
            part(teacher, start, end),
            spec,
            want_grad,
            part(tail_entropy, start, end),
            part(empty, start, end),
            tail,
        )
        return loss.sum(), kd.sum(), ce.sum(), grad_logits

    n = hidden.shape[0]
    spans = [(start, min(start + spec.chunk_size, n)) for start in range(0, n, spec.chunk_size)]
    return ChunkedHead.apply(hidden, weight, spec.vocab_size, spans, score)


def chunked_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    tail_logprob: torch.Tensor | None,
    spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed training loss over N target positions, and [divergence sum, CE sum].

    ``hidden`` [N, H]: the student's final hidden states at the positions that predict a
    target; ``weight`` [logit width, H]: its output head (rows past ``spec.vocab_size``
    are ignored and get zero gradient); ``labels`` [N]; the teacher's ``topk_ids`` [N, k],
    raw ``topk_logprobs`` [N, k] and ``tail_logprob`` [N] (None for ``sft``); an adaptive-k
    position's padding (id -1, log-prob -inf) is an empty slot (``unpadded``). The loss is
    a sum so that the caller can normalize by the tokens of a whole optimizer step.
    At T != 1 the tail bucket is softened as a Zipf tail (``losses.zipf_tail_entropy``).

    With ``spec.sampled`` the entries are a sampled dataset's draws (ids with
    ``ln(count / N)``, padded -1 / -inf; ``tail_logprob`` unused) and the divergence is
    ``-sum_i (c_i / N) log p(x_i)`` at the student's T=1 (``sampled_cross_entropy``):
    outcomes are the drawn ids plus the student's pooled rest, which has no draws, so
    each drawn id's student log-prob is its exact full-vocabulary one.
    """
    teacher = tail_entropy = empty = None
    if spec.sampled and spec.loss != "sft":
        if spec.loss != "forward_kl" or spec.temperature != 1.0:
            raise ValueError(
                "sampled draws train with --loss forward_kl at --temperature 1 only, not"
                f" {spec.loss} at {spec.temperature:g}"
            )
        topk_ids, empty = unpadded(topk_ids)
        teacher = sampled_targets(topk_logprobs, empty)
        return _sparse_head(hidden, weight, labels, topk_ids, teacher, None, empty, "bucket", spec)
    if spec.loss != "sft" and topk_ids is not None:
        topk_ids, empty = unpadded(topk_ids)
        tail = spec.tail_for(topk_ids.shape[-1])
        if tail == "bucket" and spec.temperature != 1.0:
            tail_entropy = zipf_tail_entropy(
                topk_logprobs, tail_logprob, spec.vocab_size, spec.temperature, empty
            )
        teacher = teacher_log_probs(
            topk_logprobs, tail_logprob, spec.temperature, tail, tail_entropy, empty
        )
    return _sparse_head(hidden, weight, labels, topk_ids, teacher, tail_entropy, empty, None, spec)


def union_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    score_ids: torch.Tensor,
    score_logprobs: torch.Tensor,
    spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The on-policy (GKD) loss: the divergence on the union of the teacher's top-k and
    the student's own ids, plus one tail bucket per side; summed over N positions.

    Per position that predicts a token of a sequence the student sampled:

    - ``hidden`` [N, H]: the student's final hidden states there (as for
      ``chunked_head_loss``; the head is run in chunks, never [N, V]);
    - ``weight`` [logit width, H]: its output head;
    - ``labels`` [N]: the sampled tokens (used only by the hard-label term, ``alpha``);
    - ``topk_ids`` [N, k] int64, ``topk_logprobs`` [N, k] float: the teacher's top-k and
      its raw T=1 log-probs, as ``POST /v1/score`` returns them;
    - ``score_ids`` [N, s] int64: the ids the student chose, usually its own top-s at that
      position (``score_ids`` of the score request), ``score_logprobs`` [N, s]: the
      teacher's exact T=1 log-probs at them. Ids may repeat ``topk_ids``.
    - ``spec``: ``loss`` (reverse_kl and jsd are the usual on-policy choices; forward_kl
      and tvd work too; not sft), ``beta``, ``temperature``, ``alpha``, ``chunk_size``,
      ``vocab_size``. ``spec.tail`` is not used: the rest of the mass is always a bucket.

    Returns (summed loss, [divergence sum, CE sum]) like ``chunked_head_loss``, so the
    caller normalizes by the target tokens of its optimizer step the same way. The
    teacher side is ``losses.union_teacher_log_probs``; where the student's mass lies in
    the union (its top-s holds nearly all of it) reverse KL is the exact full-vocabulary
    reverse KL.
    """
    if spec.loss == "sft":
        raise ValueError("the on-policy loss needs a divergence; 'sft' has none")
    # The live teacher's answers are log-probs, whatever the offline data's mode.
    spec = replace(spec, sampled=False)
    # An adaptive-k teacher's padding trails each position's entries (shared.reader's
    # layout); as a repeat of a kept id it is the later slot, which the union empties.
    topk_ids, padding = unpadded(topk_ids)
    ids, empty, teacher, tail_entropy = union_teacher_log_probs(
        topk_ids,
        topk_logprobs,
        score_ids,
        score_logprobs,
        spec.vocab_size,
        spec.temperature,
        padding,
    )
    return _sparse_head(hidden, weight, labels, ids, teacher, tail_entropy, empty, "bucket", spec)


@torch.no_grad()
def chunked_head_metrics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    tail_logprob: torch.Tensor | None,
    vocab_size: int,
    chunk_size: int,
) -> torch.Tensor:
    """Evaluation sums over N positions: [KL to teacher, top-1 agreements, CE, positions].

    KL is forward KL(teacher || student) at T=1 on the top-k plus tail bucket: the
    teacher's full distribution coarse-grained to k+1 outcomes, the closest the cache
    gets to the true KL (a lower bound of it). Top-1 agreement: the student's argmax over
    the vocabulary equals the teacher's most likely token. CE: ``-log p(label)`` of the
    token the teacher actually produced. Without a teacher (plain SFT data) the KL and
    agreement sums are zero.
    """
    spec = LossSpec(
        vocab_size=vocab_size, loss="forward_kl" if topk_ids is not None else "sft", tail="bucket"
    )
    dtype = _compute_dtype(hidden)
    head = weight[:vocab_size].to(dtype)
    totals = torch.zeros(4, dtype=torch.float64, device=hidden.device)
    teacher = teacher_top1 = None
    empty = None
    if topk_ids is not None:
        topk_ids, empty = unpadded(topk_ids)
        tail = spec.tail_for(topk_ids.shape[-1])
        teacher = teacher_log_probs(topk_logprobs, tail_logprob, 1.0, tail, None, empty)
        teacher_top1 = topk_ids.gather(1, topk_logprobs.argmax(-1, keepdim=True)).squeeze(1)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = (hidden[start:end].to(dtype) @ head.T).float()
            if teacher_top1 is not None:
                totals[1] += (logits.argmax(-1) == teacher_top1[start:end]).sum()
            ids = None if topk_ids is None else topk_ids[start:end]
            target = None if teacher is None else teacher[start:end]
            slots = None if empty is None else empty[start:end]
            _, kd, ce, _ = head_chunk(
                logits, labels[start:end], ids, target, spec, want_grad=False, empty=slots
            )
            totals[0] += kd.sum().double()
            totals[2] += ce.sum().double()
    totals[3] = hidden.shape[0]
    return totals
