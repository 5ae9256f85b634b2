"""How well a teacher's cached completions align with a student's tokenizer.

Before training across tokenizers it pays to know how much of the teacher's signal the
alignment keeps. Per completion the text is cut into chunks (``token_alignment``) and
counted:

- chunk coverage: the share of the completions' text bytes inside complete chunks
  (the rest, a text cut inside a character or one the student's tokenizer normalizes,
  gets no teacher signal);
- 1:1 chunks: the share of chunks with one token on each side, where every top-k id can
  be compared through the vocabulary map; the others are compared on their text's
  likelihood and by the unmatched (sorted) part only;
- matched-mass coverage: the share of the teacher's top-k probability mass, at the
  chunks' first positions, on outcomes the student matches (needs the shards' top-k;
  text-only reports leave it out);
- the same for chunks whose text holds a digit, where tokenizers differ most (single
  digits against groups of up to three, or merges learned from the corpus);
- the vocabulary map's coverage: the share of the teacher's ids with a student token of
  identical bytes.

``report_dataset`` reads a shard dataset (``distill inspect DS --student S``);
``report_texts`` takes plain texts with the two tokenizers (no teacher log-probs).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from distillcache.shared.reader import ShardDataset, decode_table

from .aligned_data import Retokenizer, RowAlignment, load_teacher_tokenizer
from .token_alignment import VocabMap


@dataclass
class AlignmentReport:
    """Counts over completions; the properties are the report's shares."""

    vocab_coverage: float
    rows: int = 0
    rows_aligned: int = 0
    text_bytes: int = 0
    chunk_bytes: int = 0
    chunks: int = 0
    one_to_one: int = 0
    digit_chunks: int = 0
    digit_one_to_one: int = 0
    teacher_tokens: int = 0
    student_tokens: int = 0
    mass: list[float] = field(default_factory=lambda: [0.0, 0.0])
    digit_mass: list[float] = field(default_factory=lambda: [0.0, 0.0])

    def add(self, row: RowAlignment | None, teacher: Retokenizer) -> np.ndarray | None:
        """Count one completion; returns per chunk whether its text holds a digit."""
        self.rows += 1
        if row is None:
            return None
        self.rows_aligned += 1
        self.text_bytes += row.text_bytes
        self.teacher_tokens += len(row.teacher_ids)
        self.student_tokens += len(row.student_ids)
        if not len(row.chunks):
            return np.zeros(0, dtype=bool)
        ends = teacher.teacher_bytes.ends(row.teacher_ids)
        covered = int(ends[row.chunks[-1, 1] - 1])
        self.chunk_bytes += min(covered, row.text_bytes)
        single = (row.chunks[:, 1] - row.chunks[:, 0] == 1) & (
            row.chunks[:, 3] - row.chunks[:, 2] == 1
        )
        table = teacher.teacher_bytes.table
        digits = np.array(
            [
                any(48 <= b <= 57 for t in row.teacher_ids[i:ie] for b in table[int(t)])
                for i, ie, _, _ in row.chunks
            ]
        )
        self.chunks += len(row.chunks)
        self.one_to_one += int(single.sum())
        self.digit_chunks += int(digits.sum())
        self.digit_one_to_one += int((single & digits).sum())
        return digits

    def add_mass(self, matched: np.ndarray, total: np.ndarray, digits: np.ndarray) -> None:
        self.mass[0] += float(matched.sum())
        self.mass[1] += float(total.sum())
        self.digit_mass[0] += float(matched[digits].sum())
        self.digit_mass[1] += float(total[digits].sum())

    def shares(self) -> dict[str, float | int]:
        def share(a: float, b: float) -> float:
            return a / b if b else float("nan")

        result = {
            "rows": self.rows,
            "rows aligned": self.rows_aligned,
            "vocabulary map coverage": self.vocab_coverage,
            "chunk coverage (bytes)": share(self.chunk_bytes, self.text_bytes),
            "chunks": self.chunks,
            "1:1 chunks": share(self.one_to_one, self.chunks),
            "teacher / student tokens": share(self.teacher_tokens, self.student_tokens),
            "digit chunks": self.digit_chunks,
            "1:1 among digit chunks": share(self.digit_one_to_one, self.digit_chunks),
        }
        if self.mass[1] > 0:
            result["matched-mass coverage"] = share(*self.mass)
            result["matched-mass coverage, digit chunks"] = share(*self.digit_mass)
        return result


def report_texts(
    texts: Iterable[str],
    teacher: PreTrainedTokenizerBase,
    student: PreTrainedTokenizerBase,
    vocab_map: VocabMap,
) -> AlignmentReport:
    """Chunk statistics of plain texts, each encoded by the teacher's tokenizer as if it
    were a cached completion (no log-probs: no matched-mass coverage)."""
    retok = Retokenizer(teacher, student, vocab_map)
    report = AlignmentReport(vocab_map.coverage)
    for text in texts:
        ids = np.asarray(teacher.encode(text, add_special_tokens=False), dtype=np.int64)
        report.add(retok.completion(ids), retok)
    return report


def report_dataset(
    dataset: str | Path,
    student: str,
    *,
    teacher_tokenizer: str | None = None,
    vocab_map_dir: str | Path = ".cache/vocab-maps",
    max_rows: int | None = None,
) -> AlignmentReport:
    """The report for a shard dataset and a student (a model or tokenizer directory/id)."""
    ds = ShardDataset(dataset)
    teacher = load_teacher_tokenizer(ds.info, teacher_tokenizer)
    student_tok = AutoTokenizer.from_pretrained(student)
    vocab_map = VocabMap.load_or_build(teacher, student_tok, vocab_map_dir)
    retok = Retokenizer(teacher, student_tok, vocab_map)
    report = AlignmentReport(vocab_map.coverage)
    for ref in ds.row_groups():
        batch = decode_table(ds.read_row_group(ref), ds.info)
        for i in range(len(batch)):
            if max_rows is not None and report.rows >= max_rows:
                return report
            prompt, completion = batch.row_prompt(i), batch.row_completion(i)
            scored = batch.row_completion_positions(i)
            row = retok.completion(completion)
            digits = report.add(row, retok)
            if row is None or not len(row.chunks):
                continue
            firsts = row.chunks[:, 0]
            probs = np.exp(batch.topk_logprobs[scored][firsts].astype(np.float64))
            example = retok.example(
                batch.keys[i],
                prompt,
                completion,
                batch.topk_ids[scored],
                batch.topk_logprobs[scored],
                batch.tail_logprob[scored],
                batch.token_logprob[scored],
            )
            matched = example.topk_ids[row.chunks[:, 2]] >= 0
            report.add_mass((probs * matched).sum(-1), probs.sum(-1), digits)
    return report
