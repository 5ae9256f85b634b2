"""Training examples streamed from a dataset with bounded memory and an exact position.

The unit of reading, shuffling and splitting is a *unit*: a row group of a shard dataset
(about 64k scored positions, as the writer sizes them) or a block of rows of a seed file.
Each epoch the units are put in a seeded order and dealt to the ranks round-robin, so
ranks read disjoint units and no rank ever reads the whole dataset. A rank then reads its
units in windows of about ``window_rows`` rows (whole units), shuffles each window with a
seed derived from (seed, epoch, rank, window start) and yields its rows. Memory is one
window plus one unit.

Because a window is a pure function of where it starts, the position
``DataPosition(epoch, unit, rows)`` (the epoch, the index in this rank's unit order of
the window's first unit, and the rows of that window already consumed) is all a
checkpoint needs to resume the stream exactly: reload that window, shuffle it the same
way, skip the consumed rows.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from distillcache.shared.manifest import DatasetError
from distillcache.shared.reader import RowGroupRef, ShardDataset, decode_table

from .teacher_check import check_teacher_rows


@dataclass
class Example:
    """One training sequence: a prompt, its completion, and the teacher's view of it.

    Row i of ``topk_ids``/``topk_logprobs`` [C, k] and ``tail_logprob`` [C] is the
    teacher's distribution over completion token i given everything before it; all three
    are None for plain SFT data (a seed file).
    """

    key: str
    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    tail_logprob: np.ndarray | None = None

    def truncated(self, max_length: int) -> Example | None:
        """Fit into ``max_length`` input positions by cutting the completion's end.

        The input is prompt + completion minus its last token (which predicts nothing),
        so a prompt of P tokens leaves room for ``max_length - P + 1`` completion tokens.
        None when the prompt leaves room for none.
        """
        room = max_length - len(self.prompt_ids) + 1
        if room < 1 or len(self.completion_ids) == 0:
            return None
        if room >= len(self.completion_ids):
            return self
        cut = slice(0, room)
        return Example(
            self.key,
            self.prompt_ids,
            self.completion_ids[cut],
            None if self.topk_ids is None else self.topk_ids[cut],
            None if self.topk_logprobs is None else self.topk_logprobs[cut],
            None if self.tail_logprob is None else self.tail_logprob[cut],
        )


@dataclass(frozen=True)
class DataPosition:
    """Where a rank's stream stands: resume by reloading the window that starts at ``unit``."""

    epoch: int = 0
    unit: int = 0
    rows: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Source(Protocol):
    """A dataset as a list of units that can each be loaded on their own."""

    def units(self) -> list[Any]: ...

    def unit_name(self, unit: Any) -> str: ...

    def load(self, unit: Any) -> list[Example]: ...


class ShardSource:
    """A shard dataset; its units are row groups.

    ``with_teacher=False`` reads only the id columns, for sequence-level KD (SFT on the
    teacher's completions), which is several times less to read and decode.
    """

    def __init__(self, root: str | Path, *, with_teacher: bool = True) -> None:
        self.dataset = ShardDataset(root)
        self.info = self.dataset.info
        self.with_teacher = with_teacher

    def units(self) -> list[RowGroupRef]:
        return self.dataset.row_groups()

    def unit_name(self, unit: RowGroupRef) -> str:
        return f"{unit.shard}#{unit.index}"

    def load(self, unit: RowGroupRef) -> list[Example]:
        if not self.with_teacher:
            table = self.dataset.read_row_group(unit, ["key", "prompt_ids", "completion_ids"])
            keys = table.column("key").to_pylist()
            prompts = table.column("prompt_ids").to_pylist()
            completions = table.column("completion_ids").to_pylist()
            return [
                Example(key, np.asarray(p, np.int32), np.asarray(c, np.int32))
                for key, p, c in zip(keys, prompts, completions, strict=True)
            ]
        batch = decode_table(self.dataset.read_row_group(unit), self.info)
        if len(batch.topk_ids) and int(batch.topk_ids.max()) >= self.info.vocab_size:
            raise DatasetError(
                f"{self.dataset.where(unit.shard)}: row group {unit.index} has top-k ids at or "
                f"past the vocabulary size {self.info.vocab_size} (padded logit rows)"
            )
        check_teacher_rows(batch, f"{self.dataset.where(unit.shard)}: row group {unit.index}")
        examples = []
        for i in range(len(batch)):
            prompt, completion = batch.row_prompt(i), batch.row_completion(i)
            try:
                scored = batch.row_completion_positions(i)
            except ValueError as e:
                raise DatasetError(
                    f"{self.dataset.where(unit.shard)}: {e}; nothing to align"
                ) from None
            examples.append(
                Example(
                    batch.keys[i],
                    prompt,
                    completion,
                    batch.topk_ids[scored],
                    batch.topk_logprobs[scored],
                    batch.tail_logprob[scored],
                )
            )
        return examples


def _unit_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def split_held_out(
    units: Sequence[Any], fraction: float, name: Callable[[Any], str]
) -> tuple[list[Any], list[Any]]:
    """(training units, held-out units): ``ceil(fraction * n)`` whole units held out.

    The held-out units are those whose names hash lowest, so the split depends on neither
    the seed nor the order of the manifest, and grows only by adding units.
    """
    if fraction <= 0.0:
        return list(units), []
    if len(units) < 2:
        raise ValueError(
            f"holding out a fraction needs at least two row groups, the data has {len(units)}; "
            "give --eval-data or write smaller row groups"
        )
    count = min(len(units) - 1, max(1, math.ceil(fraction * len(units))))
    ranked = sorted(units, key=lambda unit: _unit_hash(name(unit)))
    held = {name(unit) for unit in ranked[:count]}
    return [u for u in units if name(u) not in held], [u for u in units if name(u) in held]


def rank_units(units: Sequence[Any], seed: int, epoch: int, rank: int, world: int) -> list[Any]:
    """This rank's units for ``epoch``: a seeded permutation of all units, dealt round-robin."""
    if len(units) < world:
        raise ValueError(
            f"{len(units)} training row groups for {world} ranks: every rank needs at least "
            "one; write smaller row groups (ShardWriter row_group_tokens) or use fewer ranks"
        )
    order = np.random.default_rng([seed, epoch]).permutation(len(units))
    return [units[i] for i in order[rank::world]]


def iter_examples(
    source: Source,
    units: Sequence[Any],
    *,
    seed: int,
    rank: int,
    world: int,
    window_rows: int,
    start: DataPosition = DataPosition(),
) -> Iterator[tuple[Example, DataPosition]]:
    """Yield (example, position after it) forever, epoch after epoch, from ``start``.

    Resuming from a yielded position continues with exactly the example that followed it.
    """
    epoch, first_unit, skip = start.epoch, start.unit, start.rows
    while True:
        mine = rank_units(units, seed, epoch, rank, world)
        index = first_unit
        while index < len(mine):
            window: list[Example] = []
            end = index
            while end < len(mine) and len(window) < window_rows:
                window += source.load(mine[end])
                end += 1
            order = np.random.default_rng([seed, epoch, rank, index]).permutation(len(window))
            for consumed in range(skip, len(window)):
                yield window[order[consumed]], DataPosition(epoch, index, consumed + 1)
            index, skip = end, 0
        epoch, first_unit = epoch + 1, 0


def iter_held_out(
    source: Source, units: Sequence[Any], *, rank: int, world: int
) -> Iterator[Example]:
    """One pass over the held-out units in order, every ``world``-th row for this rank.

    Rows rather than units are dealt out so that ranks get nearly equal shares of a small
    evaluation set; each rank reads every held-out unit.
    """
    row = 0
    for unit in units:
        for example in source.load(unit):
            if row % world == rank:
                yield example
            row += 1
