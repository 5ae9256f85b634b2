"""The teacher rows the losses can take, and the check that refuses the others at decode.

A scored position holds the teacher's top-k ids, their log-probs and the log of the mass
outside them (``shared.codec``). The losses (``losses.py``) accept any log-prob in
``[-inf, 0]``: a ``-inf`` (a masked logit, or a tail the top-k holds entirely) is floored
there. Two things they cannot make sense of, and would otherwise turn silently into a
NaN loss or a wrong one, are refused here, when a row group is decoded for training:

- a NaN or ``+inf`` among the top-k log-probs or in the tail: the number was lost; the
  loss would be NaN and, once its gradient reaches the weights, so would the student;
- an id that occurs twice in one position's top-k: the outcomes of a divergence must be
  distinct, and a repeated id would count the student's probability of it twice. The
  padding of an adaptive-k position (``shared.reader.PAD_ID``, log-prob -inf) is no
  outcome and may repeat; the losses mask it.

The check is vectorized over the whole row group (a few passes over [positions, k]; ids
are sorted only in rows not already in the writers' ascending order); it answers with
the first bad position so the error can name its row.
"""

from __future__ import annotations

import numpy as np

from distillcache.shared.manifest import DatasetError
from distillcache.shared.reader import PAD_ID, DecodedBatch


def first_bad_position(
    topk_ids: np.ndarray, topk_logprobs: np.ndarray, tail_logprob: np.ndarray
) -> tuple[int, str] | None:
    """(index, what is wrong) of the first position the losses cannot take, or None.

    ``topk_ids`` and ``topk_logprobs`` [n, k], ``tail_logprob`` [n], as decoded.
    """
    problems = []
    lost = ~np.isfinite(topk_logprobs) & ~np.isneginf(topk_logprobs)
    if lost.any():
        i = int(lost.any(axis=1).argmax())
        value = topk_logprobs[i][lost[i]][0]
        problems.append((i, f"a top-k log-prob is {value} (want a number in [-inf, 0])"))
    lost_tail = ~np.isfinite(tail_logprob) & ~np.isneginf(tail_logprob)
    if lost_tail.any():
        i = int(lost_tail.argmax())
        problems.append((i, f"tail_logprob is {tail_logprob[i]} (want a number in [-inf, 0])"))
    if topk_ids.shape[-1] > 1:
        # Writers store each position's ids ascending (shared.codec), so one comparison
        # clears almost every row; only the others are sorted to look for a repeat.
        unsorted = np.flatnonzero((topk_ids[:, 1:] <= topk_ids[:, :-1]).any(axis=1))
        ordered = np.sort(topk_ids[unsorted], axis=1)
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != PAD_ID)
        if repeated.any():
            row = int(repeated.any(axis=1).argmax())
            token = int(ordered[row, 1:][repeated[row]][0])
            problems.append(
                (
                    int(unsorted[row]),
                    f"top-k id {token} occurs twice (a position's ids are distinct)",
                )
            )
    return min(problems) if problems else None


def check_teacher_rows(batch: DecodedBatch, where: str) -> None:
    """Raise ``DatasetError`` naming the row and position of the first bad teacher row.

    ``where`` names the row group (shard path and index) for the message.
    """
    bad = first_bad_position(batch.topk_ids, batch.topk_logprobs, batch.tail_logprob)
    if bad is None:
        return
    position, problem = bad
    row = int(np.searchsorted(batch.pos_offsets, position, side="right")) - 1
    raise DatasetError(
        f"{where}, row {batch.keys[row][:16]}, scored position "
        f"{position - int(batch.pos_offsets[row])}: {problem}; the shard is corrupt: "
        "write it again with `distill cache`"
    )
