"""Teacher shards read for a student with another tokenizer: retokenized, chunk-aligned.

Each cached row is turned into the student's view of it. The prompt's text (special
tokens written as their own text) is re-encoded with the student's tokenizer, so the
student reads the prompt the teacher was given, in its own ids. The completion's bytes
are re-encoded the same way; a completion that ended with the teacher's eos ends with
the student's. Both completions are then cut into chunks (``token_alignment``): spans
of bytes that both tokenizations cut at.

Per student completion position the example carries what the loss needs at the first
position of each chunk: the teacher's top-k at the chunk's first teacher position with
its ids mapped to student ids (-1 where nothing matches), its tail, the teacher's
log-prob of the token it observed there, and ``teacher_rest``, the sum of its log-probs
of the other observed tokens inside the chunk. What counts as matched depends on the
chunk:

- 1:1 chunk (one token on each side, the same text): every top-k id goes through the
  vocabulary map.
- any longer chunk (the two tokenizers cut this text differently, e.g. "123" as "1" "2"
  "3" against "123"): only the teacher's observed first token is matched, to the
  student's observed first token. Both, multiplied by their continuations inside the
  chunk, are the probability of the chunk's text, the one outcome the two sides share.
  Mapping the teacher's other first-token alternatives by bytes would compare a digit
  with a digit that, for the student, stands for a different split of the number (the
  multi-digit failure behind the GSM8K collapse reported for byte-mapped hybrids); they
  go to the unmatched part, which only compares sorted probabilities.

Positions past the last complete chunk (a completion cut by ``max_length``, or text that
ends inside a character) get the hard-label term only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from distillcache.shared.keys import tokenizer_hash
from distillcache.shared.manifest import DatasetError
from distillcache.shared.reader import RowGroupRef, decode_table
from distillcache.shared.schema import DatasetInfo

from .batching import MAX_SKIPPED_IN_A_ROW, Batch, collate
from .config import TrainConfig
from .seq_kd import is_seed_file
from .stream import DataPosition, Example, ShardSource, split_held_out
from .token_alignment import TokenBytes, VocabMap, align_chunks

log = logging.getLogger(__name__)


@dataclass
class AlignedExample(Example):
    """An ``Example`` in the student's ids, with the chunk alignment per completion position.

    ``topk_ids`` hold student ids (-1: unmatched) and, with ``topk_logprobs``,
    ``tail_logprob``, ``teacher_logprob`` and ``teacher_rest``, are meaningful where
    ``chunk_first``; ``aligned`` marks positions inside a complete chunk.
    ``completion_bytes`` is the UTF-8 length of the completion's text (without special
    tokens), the denominator of bits per byte. ``score_ids`` [C, s] (student ids, -1 none)
    and ``score_logprobs`` [C, s]: the teacher's exact log-probs at the student's own ids,
    at 1:1 chunks of on-policy samples (s = 0 for cached rows).
    """

    chunk_first: np.ndarray | None = None
    aligned: np.ndarray | None = None
    teacher_logprob: np.ndarray | None = None
    teacher_rest: np.ndarray | None = None
    completion_bytes: int = 0
    byte_ends: np.ndarray | None = None
    score_ids: np.ndarray | None = None
    score_logprobs: np.ndarray | None = None

    def truncated(self, max_length: int) -> AlignedExample | None:
        """Cut the completion as ``Example.truncated`` does; a chunk cut in two loses its
        alignment (its teacher continuation reaches past the cut)."""
        room = max_length - len(self.prompt_ids) + 1
        if room < 1 or len(self.completion_ids) == 0:
            return None
        if room >= len(self.completion_ids):
            return self
        cut = slice(0, room)
        aligned = self.aligned[cut].copy()
        first = self.chunk_first[cut].copy()
        if not (self.chunk_first[room] or not self.aligned[room]):
            starts = np.flatnonzero(first)
            if len(starts):
                aligned[starts[-1] :] = False
                first[starts[-1] :] = False
        return AlignedExample(
            self.key,
            self.prompt_ids,
            self.completion_ids[cut],
            self.topk_ids[cut],
            self.topk_logprobs[cut],
            self.tail_logprob[cut],
            first,
            aligned,
            self.teacher_logprob[cut],
            self.teacher_rest[cut],
            int(self.byte_ends[room - 1]),
            self.byte_ends[cut],
            self.score_ids[cut],
            self.score_logprobs[cut],
        )


@dataclass
class RowAlignment:
    """The two tokenizations of one completion and their chunks (for reports and tests)."""

    teacher_ids: np.ndarray
    student_ids: np.ndarray
    chunks: np.ndarray
    text_bytes: int


class Retokenizer:
    """Ids of one tokenizer to the other's through text, keeping byte offsets on both sides.

    Shards go teacher to student (``completion``, ``example``); on-policy samples go
    student to teacher (``to_teacher``), and ``pair`` / ``layout`` align a completion
    whose two tokenizations are both given.
    """

    def __init__(
        self,
        teacher: PreTrainedTokenizerBase,
        student: PreTrainedTokenizerBase,
        vocab_map: VocabMap,
    ) -> None:
        self.teacher, self.student = teacher, student
        self.teacher_bytes, self.student_bytes = TokenBytes(teacher), TokenBytes(student)
        self.vocab_map = vocab_map
        self.teacher_eos = teacher.eos_token_id
        self.student_eos = student.eos_token_id

    def prompt(self, teacher_ids: np.ndarray) -> np.ndarray:
        text = self.teacher_bytes.text_bytes(teacher_ids).decode("utf-8", errors="replace")
        return np.asarray(self.student.encode(text, add_special_tokens=False), dtype=np.int32)

    def completion(self, teacher_ids: np.ndarray) -> RowAlignment | None:
        """Student ids for the completion and the chunks; None when the student's tokens
        do not spell the text back (a normalizing tokenizer), which cannot be aligned."""
        teacher_ids = np.asarray(teacher_ids, dtype=np.int64)
        ends_with_eos = len(teacher_ids) > 0 and int(teacher_ids[-1]) == self.teacher_eos
        body = teacher_ids[:-1] if ends_with_eos else teacher_ids
        raw = self.teacher_bytes.text_bytes(body)
        # A completion stopped at max_tokens can end inside a character: those bytes have
        # no text, so both sides stop before them.
        text = raw.decode("utf-8", errors="ignore")
        if text.encode() != raw[: len(text.encode())]:
            return None
        student = np.asarray(self.student.encode(text, add_special_tokens=False), dtype=np.int64)
        if self.student_bytes.text_bytes(student) != text.encode():
            return None
        if ends_with_eos and self.student_eos is not None:
            student = np.append(student, self.student_eos)
        return self.pair(teacher_ids, student, len(text.encode()))

    def to_teacher(self, student_ids: np.ndarray) -> np.ndarray:
        """The teacher's ids for a completion the student sampled: its text encoded with
        the teacher's tokenizer, closed with the teacher's eos when the student stopped.

        The text is the longest valid UTF-8 prefix of the student's bytes (a sampled byte
        token can leave a character unfinished); a cut text gets no eos, as the student
        did not stop there. Empty when nothing of the text can be spelled back by the
        teacher's tokens; then no position can be aligned.
        """
        student_ids = np.asarray(student_ids, dtype=np.int64)
        stopped = len(student_ids) > 0 and int(student_ids[-1]) == self.student_eos
        raw = self.student_bytes.text_bytes(student_ids[:-1] if stopped else student_ids)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            text, stopped = raw[: error.start].decode("utf-8"), False
        teacher = np.asarray(self.teacher.encode(text, add_special_tokens=False), dtype=np.int64)
        if self.teacher_bytes.text_bytes(teacher) != text.encode():
            return np.zeros(0, dtype=np.int64)
        if stopped and self.teacher_eos is not None:
            teacher = np.append(teacher, self.teacher_eos)
        return teacher

    def pair(
        self, teacher_ids: np.ndarray, student_ids: np.ndarray, text_bytes: int
    ) -> RowAlignment:
        """The chunks of two tokenizations of one completion (each maybe closed by its
        eos; the two eos tokens are a chunk of their own when both sides stop right after
        the same text). ``text_bytes``: the UTF-8 length of the text both spell."""
        teacher_ids = np.asarray(teacher_ids, dtype=np.int64)
        student_ids = np.asarray(student_ids, dtype=np.int64)
        teacher_stops = len(teacher_ids) > 0 and int(teacher_ids[-1]) == self.teacher_eos
        student_stops = (
            self.student_eos is not None
            and len(student_ids) > 0
            and int(student_ids[-1]) == self.student_eos
        )
        n = len(teacher_ids) - teacher_stops
        m = len(student_ids) - student_stops
        chunks = align_chunks(
            self.teacher_bytes.ends(teacher_ids[:n]), self.student_bytes.ends(student_ids[:m])
        )
        complete = len(chunks) and chunks[-1, 1] == n and chunks[-1, 3] == m
        if teacher_stops and student_stops and (complete or n == m == 0):
            chunks = np.concatenate([chunks.reshape(-1, 4), [[n, n + 1, m, m + 1]]])
        return RowAlignment(teacher_ids, student_ids, chunks.astype(np.int64), text_bytes)

    def example(
        self,
        key: str,
        prompt_ids: np.ndarray,
        completion_ids: np.ndarray,
        topk_ids: np.ndarray,
        topk_logprobs: np.ndarray,
        tail_logprob: np.ndarray,
        token_logprob: np.ndarray,
    ) -> AlignedExample | None:
        """One cached row (teacher ids, per completion token top-k, tail, observed
        log-prob) as the student's aligned example; None when it cannot be aligned."""
        row = self.completion(completion_ids)
        if row is None or len(row.student_ids) == 0:
            return None
        return self.layout(
            key, self.prompt(prompt_ids), row, topk_ids, topk_logprobs, tail_logprob, token_logprob
        )

    def layout(
        self,
        key: str,
        student_prompt: np.ndarray,
        row: RowAlignment,
        topk_ids: np.ndarray,
        topk_logprobs: np.ndarray,
        tail_logprob: np.ndarray,
        token_logprob: np.ndarray,
        score_ids: np.ndarray | None = None,
        score_logprobs: np.ndarray | None = None,
    ) -> AlignedExample:
        """The aligned example of ``row``, the teacher's values per teacher completion
        position laid out on the student's positions (see the module doc). ``score_ids``
        [C_student, s] and ``score_logprobs`` [C_teacher, s]: an on-policy sample's own ids
        per student position (-1 none) and the teacher's log-probs there per teacher
        position, kept at 1:1 chunks (where one position on each side is the same text)."""
        n, k = len(row.student_ids), topk_ids.shape[1]
        s = 0 if score_ids is None else score_ids.shape[1]
        student_scored = np.full((n, s), -1, dtype=np.int64)
        scored = np.zeros((n, s), dtype=np.float32)
        mapped = np.full((n, k), -1, dtype=np.int64)
        logprobs = np.zeros((n, k), dtype=np.float32)
        tail = np.zeros(n, dtype=np.float32)
        observed = np.zeros(n, dtype=np.float32)
        rest = np.zeros(n, dtype=np.float32)
        first = np.zeros(n, dtype=bool)
        aligned = np.zeros(n, dtype=bool)
        table = self.vocab_map.teacher_to_student
        for i, i_end, j, j_end in row.chunks:
            teacher_first = int(row.teacher_ids[i])
            student_first = int(row.student_ids[j])
            top = topk_ids[i].astype(np.int64)
            if i_end - i == 1 and j_end - j == 1:
                ids = table[top]
                ids[ids == student_first] = -1
            else:
                ids = np.full(k, -1, dtype=np.int64)
            ids[top == teacher_first] = student_first
            mapped[j] = ids
            logprobs[j] = topk_logprobs[i]
            tail[j] = tail_logprob[i]
            observed[j] = token_logprob[i]
            rest[j] = token_logprob[i + 1 : i_end].sum()
            first[j] = True
            aligned[j:j_end] = True
            if s and i_end - i == 1 and j_end - j == 1:
                student_scored[j] = score_ids[j]
                scored[j] = score_logprobs[i]
        ends = np.minimum(self.student_bytes.ends(row.student_ids), row.text_bytes)
        return AlignedExample(
            key,
            np.asarray(student_prompt, dtype=np.int32),
            row.student_ids.astype(np.int32),
            mapped,
            logprobs,
            tail,
            first,
            aligned,
            observed,
            rest,
            row.text_bytes,
            ends,
            student_scored,
            scored,
        )


class AlignedShardSource:
    """A shard dataset read for a student with another tokenizer (see the module doc).

    Units are the dataset's row groups, as for ``ShardSource``; rows that cannot be
    aligned are skipped and counted in the log.
    """

    def __init__(self, root: str | Path, retokenizer: Retokenizer) -> None:
        self.shards = ShardSource(root)
        self.dataset, self.info = self.shards.dataset, self.shards.info
        if self.info.adaptive is not None:
            # Its positions are padded to k with id -1, which the alignment reads as an
            # unmatched student id; the chunk loss has no mask for that padding.
            raise DatasetError(
                f"{self.dataset.root}: a dataset with adaptive k ({self.info.adaptive}) is not"
                " supported across tokenizers yet; capture it with a fixed k"
            )
        if self.info.sampled is not None:
            # Chunk distributions multiply probabilities, which draws do not carry.
            raise DatasetError(
                f"{self.dataset.root}: a sampled dataset (draws, no log-probs) is not"
                " supported across tokenizers; capture it with a fixed k"
            )
        self.retokenizer = retokenizer

    def units(self) -> list[RowGroupRef]:
        return self.shards.units()

    def unit_name(self, unit: RowGroupRef) -> str:
        return self.shards.unit_name(unit)

    def load(self, unit: RowGroupRef) -> list[AlignedExample]:
        batch = decode_table(self.dataset.read_row_group(unit), self.info)
        examples, skipped = [], 0
        for i in range(len(batch)):
            prompt, completion = batch.row_prompt(i), batch.row_completion(i)
            scored = batch.row_completion_positions(i)
            example = self.retokenizer.example(
                batch.keys[i],
                prompt,
                completion,
                batch.topk_ids[scored],
                batch.topk_logprobs[scored],
                batch.tail_logprob[scored],
                batch.token_logprob[scored],
            )
            if example is None:
                skipped += 1
            else:
                examples.append(example)
        if skipped:
            log.warning("%s: %d rows could not be aligned", self.unit_name(unit), skipped)
        return examples


@dataclass
class AlignedBatch(Batch):
    """A ``Batch`` plus, per target position, the chunk alignment (see ``AlignedExample``)."""

    chunk_first: torch.Tensor | None = None
    aligned: torch.Tensor | None = None
    teacher_logprob: torch.Tensor | None = None
    teacher_rest: torch.Tensor | None = None
    completion_bytes: int = 0
    score_ids: torch.Tensor | None = None
    score_logprobs: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> AlignedBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return AlignedBatch(**moved)


def collate_aligned(examples: list[AlignedExample], pad_id: int) -> AlignedBatch:
    """Padded rows, one example each, with the alignment in target order."""
    base = collate([[e] for e in examples], pad_id, packed=False)

    def cat(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([getattr(e, name) for e in examples])).to(dtype)

    return AlignedBatch(
        **{f.name: getattr(base, f.name) for f in fields(base)},
        chunk_first=cat("chunk_first", torch.bool),
        aligned=cat("aligned", torch.bool),
        teacher_logprob=cat("teacher_logprob", torch.float32),
        teacher_rest=cat("teacher_rest", torch.float32),
        completion_bytes=sum(e.completion_bytes for e in examples),
        score_ids=cat("score_ids", torch.long),
        score_logprobs=cat("score_logprobs", torch.float32),
    )


def iter_aligned_batches(
    stream: Iterable[tuple[AlignedExample, DataPosition]],
    *,
    batch_size: int,
    max_length: int,
    pad_id: int,
) -> Iterator[tuple[AlignedBatch, DataPosition]]:
    """Yield (batch, stream position after its last example): ``batch_size`` examples
    padded to the longest, cut to ``max_length`` as ``iter_batches`` cuts them."""
    rows: list[AlignedExample] = []
    position = DataPosition()
    skipped = 0
    for example, after in stream:
        position = after
        fitted = example.truncated(max_length)
        if fitted is None:
            skipped += 1
            if skipped >= MAX_SKIPPED_IN_A_ROW:
                raise ValueError(
                    f"{skipped} examples in a row have no completion token within "
                    f"max_length={max_length}: raise --max-length"
                )
            continue
        skipped = 0
        rows.append(fitted)
        if len(rows) == batch_size:
            yield collate_aligned(rows, pad_id), position
            rows = []
    if rows:
        yield collate_aligned(rows, pad_id), position


def load_teacher_tokenizer(info: DatasetInfo, override: str | None) -> PreTrainedTokenizerBase:
    """The teacher's tokenizer, from ``override`` or where the dataset says, checked
    against the dataset's tokenizer hash."""
    where = override or info.tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot load the teacher's tokenizer from {where!r} ({error}); give its directory "
            "with --teacher-tokenizer"
        ) from None
    if tokenizer_hash(tokenizer) != info.tokenizer_hash:
        raise ValueError(
            f"the tokenizer at {where} does not hash to the dataset's tokenizer_hash "
            f"{info.tokenizer_hash[:12]}: give the teacher's own tokenizer with --teacher-tokenizer"
        )
    return tokenizer


def open_aligned_data(config: TrainConfig, tokenizer: PreTrainedTokenizerBase):
    """``data.open_data`` for ``cross_tokenizer``: the shards (and eval shards) read as
    aligned examples for the student's ``tokenizer`` (before a pad token is added: the
    vocabulary map is keyed by its hash). Returns the ``RunData`` and the ``VocabMap``."""
    # Imported here: data imports student, which imports this module.
    from .data import RunData

    for path in (config.data, config.eval_data):
        if path is not None and is_seed_file(path):
            raise ValueError(
                f"{path} is a seed file: its text is rendered with the student's own tokenizer "
                "already; drop --cross-tokenizer (and use --loss sft)"
            )
    info = ShardSource(config.data).info
    teacher = load_teacher_tokenizer(info, config.teacher_tokenizer)
    vocab_map = VocabMap.load_or_build(teacher, tokenizer, config.vocab_map_dir)
    retokenizer = Retokenizer(teacher, tokenizer, vocab_map)
    source = AlignedShardSource(config.data, retokenizer)
    train_units, held = split_held_out(source.units(), config.eval_fraction, source.unit_name)
    eval_source = source
    if config.eval_data is not None:
        eval_info = ShardSource(config.eval_data).info
        if eval_info.tokenizer_hash != info.tokenizer_hash:
            raise ValueError(
                f"{config.eval_data} was made with another tokenizer than {config.data}"
            )
        eval_source = AlignedShardSource(config.eval_data, retokenizer)
        held = eval_source.units()
    log.info("vocabulary map %s -> student: coverage %.3f", info.tokenizer, vocab_map.coverage)
    return RunData(source, train_units, eval_source, held), vocab_map
