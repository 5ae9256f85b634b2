"""Examples to model inputs: padded to the longest in the batch, or packed into rows.

A batch carries the model inputs and, flattened over every position that predicts a
completion token, the targets: where the prediction is made (row, column), the token
that came next (the hard label), and the teacher's top-k distribution at that position.
Prompt positions have no target, which is what masking the prompt in the labels means.
The input is prompt + completion without the completion's last token, since the output
after the last token predicts nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch

from .stream import DataPosition, Example


@dataclass
class Batch:
    """Model inputs [rows, width] and targets [N] (N positions that predict a token).

    ``attention_mask`` is None for packed rows: the restarting ``position_ids`` tell the
    model where each packed sequence begins, and transformers then keeps attention
    within each one (block-diagonal causal mask; varlen kernels on flash attention).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    target_rows: torch.Tensor
    target_cols: torch.Tensor
    labels: torch.Tensor
    topk_ids: torch.Tensor | None
    topk_logprobs: torch.Tensor | None
    tail_logprob: torch.Tensor | None
    keys: list[str]

    @property
    def n_targets(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return Batch(**moved)


def collate(rows: list[list[Example]], pad_id: int, packed: bool) -> Batch:
    """Lay out examples: each inner list is one row (one example unless ``packed``)."""
    lengths = [sum(len(e.prompt_ids) + len(e.completion_ids) - 1 for e in row) for row in rows]
    width = max(lengths)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    position_ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    target_rows, target_cols, labels, keys = [], [], [], []
    with_teacher = rows[0][0].topk_ids is not None
    topk_ids, topk_logprobs, tails = [], [], []
    for r, row in enumerate(rows):
        col = 0
        for example in row:
            tokens = np.concatenate([example.prompt_ids, example.completion_ids[:-1]])
            n, prompt = len(tokens), len(example.prompt_ids)
            input_ids[r, col : col + n] = tokens
            position_ids[r, col : col + n] = np.arange(n)
            mask[r, col : col + n] = 1
            completion = len(example.completion_ids)
            target_rows.append(np.full(completion, r))
            target_cols.append(np.arange(col + prompt - 1, col + prompt - 1 + completion))
            labels.append(example.completion_ids)
            keys.append(example.key)
            if with_teacher:
                topk_ids.append(example.topk_ids)
                topk_logprobs.append(example.topk_logprobs)
                tails.append(example.tail_logprob)
            col += n
        # Padding gets positions of its own so that, packed, it forms a separate sequence.
        position_ids[r, col:] = np.arange(width - col)

    def tensor(parts: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts)).to(dtype)

    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=None if packed else torch.from_numpy(mask),
        position_ids=torch.from_numpy(position_ids),
        target_rows=tensor(target_rows, torch.long),
        target_cols=tensor(target_cols, torch.long),
        labels=tensor(labels, torch.long),
        topk_ids=tensor(topk_ids, torch.long) if with_teacher else None,
        topk_logprobs=tensor(topk_logprobs, torch.float32) if with_teacher else None,
        tail_logprob=tensor(tails, torch.float32) if with_teacher else None,
        keys=keys,
    )


# Consecutive examples with nothing left to train on after which the stream is declared
# unusable: an endless stream of them would otherwise spin forever without a batch.
MAX_SKIPPED_IN_A_ROW = 10_000


def iter_batches(
    stream: Iterable[tuple[Example, DataPosition]],
    *,
    batch_size: int,
    max_length: int,
    pad_id: int,
    packing: bool,
) -> Iterator[tuple[Batch, DataPosition]]:
    """Yield (batch, stream position after its last example).

    Padding: ``batch_size`` examples per batch. Packing: examples are placed, in stream
    order, into the first of ``batch_size`` rows of ``max_length`` positions with room;
    the first example that fits nowhere starts the next batch. Either way a batch is a
    contiguous run of the stream, so the position after it resumes exactly. Examples
    longer than ``max_length`` lose the end of their completion; examples with no
    completion left are skipped.
    """
    pending: tuple[Example, DataPosition] | None = None
    source = iter(stream)
    position = DataPosition()
    skipped = 0
    while True:
        rows: list[list[Example]] = []
        room: list[int] = []
        while True:
            if pending is None:
                item = next(source, None)
                if item is None:
                    break
                example, after = item
                fitted = example.truncated(max_length)
                if fitted is None:
                    position, skipped = after, skipped + 1
                    if skipped >= MAX_SKIPPED_IN_A_ROW:
                        raise ValueError(
                            f"{skipped} examples in a row have no completion token within "
                            f"max_length={max_length}: raise --max-length"
                        )
                    continue
                pending, skipped = (fitted, after), 0
            example, after = pending
            length = len(example.prompt_ids) + len(example.completion_ids) - 1
            if packing:
                slot = next((i for i, free in enumerate(room) if free >= length), None)
                if slot is None and len(rows) < batch_size:
                    rows.append([])
                    room.append(max_length)
                    slot = len(rows) - 1
                if slot is None:
                    break
                rows[slot].append(example)
                room[slot] -= length
            else:
                rows.append([example])
            position, pending = after, None
            if not packing and len(rows) == batch_size:
                break
        if not rows:
            return
        yield collate(rows, pad_id, packing), position
