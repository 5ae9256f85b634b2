"""Sequence-level KD straight from a seed file: SFT on ``{question, teacher_solution}`` rows.

Sequence-level KD from shards needs nothing special: a ``ShardSource`` read without the
teacher columns gives the teacher's completions as plain SFT targets (``--loss sft``).
This module covers the other road, where the teacher's answers already sit in an input
file (the product's seed format, or any row shape ``shared.inputs`` reads that carries a
completion) and no teacher has run: rows are rendered the way the teacher service renders
them (the tokenizer's chat template for the prompt, the solution plus eos for the
completion) so that a model trained here sees exactly the prompts the cache would hold.

Seed files are small next to shards (token ids only, no top-k), so the rendered ids are
held in memory, 4 bytes a token; blocks of rows then play the part of row groups, so
shuffling, rank splitting and resume work as for shards.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from distillcache.shared.inputs import InputError, iter_input_rows, render_completion, render_prompt

from .stream import Example

log = logging.getLogger(__name__)

SEED_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".parquet")


def is_seed_file(path: str | Path) -> bool:
    """A seed file is a file with an input suffix; a shard dataset is a directory."""
    path = Path(path)
    return not path.is_dir() and path.name.lower().endswith(SEED_SUFFIXES)


def example_key(prompt_ids: np.ndarray, completion_ids: np.ndarray) -> str:
    """Content hash of the ids, so a row's identity (and the held-out split) survives edits
    elsewhere in the file."""
    h = hashlib.sha256(prompt_ids.astype(np.int32).tobytes())
    h.update(b"|")
    h.update(completion_ids.astype(np.int32).tobytes())
    return h.hexdigest()


class SeedFileSource:
    """A seed file as SFT examples, in blocks of ``block_rows`` rows.

    Rows that ``shared.inputs`` rejects, or that carry no completion, are skipped and
    counted in the log: the same policy as the teacher's batch jobs.
    """

    def __init__(
        self, path: str | Path, tokenizer: PreTrainedTokenizerBase, *, block_rows: int = 32
    ) -> None:
        self.path = Path(path)
        self.block_rows = block_rows
        self.examples: list[Example] = []
        skipped: list[str] = []
        for item in iter_input_rows(self.path):
            if isinstance(item, InputError):
                skipped.append(str(item))
                continue
            if item.completion is None:
                skipped.append(f"{item.source}:{item.line}: no teacher_solution or completion")
                continue
            prompt = np.asarray(render_prompt(tokenizer, item.messages), dtype=np.int32)
            completion = np.asarray(render_completion(tokenizer, item.completion), dtype=np.int32)
            self.examples.append(Example(example_key(prompt, completion), prompt, completion))
        if skipped:
            log.warning(
                "%s: skipped %d rows, first: %s", self.path, len(skipped), "; ".join(skipped[:3])
            )
        if not self.examples:
            raise ValueError(f"{self.path}: no usable rows with a completion to train on")

    def units(self) -> list[int]:
        return list(range(math.ceil(len(self.examples) / self.block_rows)))

    def unit_name(self, unit: int) -> str:
        return f"{self.path.name}#{unit}"

    def load(self, unit: int) -> list[Example]:
        return self.examples[unit * self.block_rows : (unit + 1) * self.block_rows]
