"""Aligning two tokenizations of one text: token bytes, chunks, and the vocabulary map.

Cross-tokenizer distillation compares a teacher and a student that cut the same text into
different tokens. Everything here works on UTF-8 bytes, the one thing both tokenizers
agree on:

- ``TokenBytes`` gives every id of a tokenizer the exact bytes it stands for (byte-level
  BPE as in GPT-2, SmolLM2, Qwen2 and Llama 3; SentencePiece pieces with ``▁`` and
  ``<0xNN>`` byte fallback), so a token sequence has byte end offsets without any
  offset-mapping support from the tokenizer (which normalizers and byte-level merges
  make unreliable).
- ``align_chunks`` walks two end-offset lists and closes a chunk wherever both end at the
  same byte: each chunk is the shortest span of text that both tokenizations cut at. A
  chunk with one token on each side ("1:1") holds the same token text on both sides.
- ``VocabMap`` maps a teacher id to the student id with identical bytes (the same token
  string wins when several do, so a tokenizer mapped onto itself gives the identity).
  It is built once per tokenizer pair and cached on disk under the two tokenizers'
  hashes; its coverage is the share of the teacher's vocabulary it maps.

The loss that uses these lives in ``cross_tokenizer``; reading shards into aligned
examples in ``aligned_data``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from distillcache.shared.keys import tokenizer_hash


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's reversible byte -> printable character table, inverted (char -> byte)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenBytes:
    """The bytes of every id of a tokenizer, and byte end offsets of id sequences.

    Special and added tokens stand for their own text (``<|im_end|>``), which is what a
    decoder that keeps special tokens writes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        vocab = tokenizer.get_vocab()
        self.size = max(vocab.values()) + 1
        added = set(tokenizer.get_added_vocab())
        pieces = [t for t in vocab if t not in added]
        byte_level = all(ch in _BYTE_LEVEL for t in pieces for ch in t)
        table: list[bytes] = [b""] * self.size
        for token, index in vocab.items():
            if token in added:
                table[index] = token.encode()
            elif byte_level:
                table[index] = bytes(_BYTE_LEVEL[ch] for ch in token)
            elif match := _BYTE_FALLBACK.match(token):
                table[index] = bytes([int(match.group(1), 16)])
            else:
                table[index] = token.replace("▁", " ").encode()
        self.table = table
        self.strings = {index: token for token, index in vocab.items()}
        self.lengths = np.array([len(b) for b in table], dtype=np.int64)
        self.special = {vocab[t] for t in added}

    def text_bytes(self, ids: np.ndarray) -> bytes:
        return b"".join(self.table[int(i)] for i in ids)

    def ends(self, ids: np.ndarray) -> np.ndarray:
        """Byte offset where each token ends, counting from the first token's start."""
        return np.cumsum(self.lengths[np.asarray(ids, dtype=np.int64)])


def align_chunks(teacher_ends: np.ndarray, student_ends: np.ndarray) -> np.ndarray:
    """Chunks of two tokenizations of the same bytes: [n, 4] rows ``(i, i', j, j')``.

    Teacher tokens ``i .. i'-1`` and student tokens ``j .. j'-1`` cover the same bytes, and
    no shorter prefix of them does. Walks both end lists once. Tokens past the last common
    end (a text cut inside a character, say) belong to no chunk.
    """
    chunks = []
    i = j = 0
    start_i = start_j = 0
    n, m = len(teacher_ends), len(student_ends)
    while i < n and j < m:
        a, b = teacher_ends[i], student_ends[j]
        if a == b:
            i, j = i + 1, j + 1
            chunks.append((start_i, i, start_j, j))
            start_i, start_j = i, j
        elif a < b:
            i += 1
        else:
            j += 1
    return np.asarray(chunks, dtype=np.int64).reshape(-1, 4)


@dataclass
class VocabMap:
    """Teacher id -> student id with identical bytes, -1 where the student has none.

    ``student_mapped`` marks the student ids some teacher id maps to; the map is
    injective, so a student id stands for at most one teacher outcome.
    """

    teacher_to_student: np.ndarray
    student_mapped: np.ndarray

    def student_to_teacher(self) -> np.ndarray:
        """The inverse map over the student's ids (the map is injective): the teacher id of
        identical bytes, -1 where none."""
        inverse = np.full(len(self.student_mapped), -1, dtype=np.int64)
        known = np.flatnonzero(self.teacher_to_student >= 0)
        inverse[self.teacher_to_student[known]] = known
        return inverse

    @property
    def coverage(self) -> float:
        """Share of the teacher's vocabulary that has a student counterpart."""
        return float((self.teacher_to_student >= 0).mean())

    @classmethod
    def build(cls, teacher: TokenBytes, student: TokenBytes) -> VocabMap:
        by_bytes: dict[bytes, int] = {}
        for index in sorted(range(student.size), reverse=True):
            if student.table[index]:
                by_bytes[student.table[index]] = index
        by_string = {token: index for index, token in student.strings.items()}
        mapping = np.full(teacher.size, -1, dtype=np.int64)
        taken = np.zeros(student.size, dtype=bool)
        # First the tokens spelled the same (identity for one tokenizer on both sides),
        # then the rest by bytes; each student id is taken once.
        for index in range(teacher.size):
            target = by_string.get(teacher.strings.get(index, ""))
            if target is not None and student.table[target] == teacher.table[index]:
                mapping[index] = target
                taken[target] = True
        for index in range(teacher.size):
            if mapping[index] >= 0 or not teacher.table[index]:
                continue
            target = by_bytes.get(teacher.table[index])
            if target is not None and not taken[target]:
                mapping[index] = target
                taken[target] = True
        return cls(mapping, taken)

    @classmethod
    def load_or_build(
        cls,
        teacher: PreTrainedTokenizerBase,
        student: PreTrainedTokenizerBase,
        cache_dir: str | Path,
    ) -> VocabMap:
        """The map for this pair from ``cache_dir``, built and saved there on first use.

        The file is named by both tokenizers' hashes (vocabulary and special tokens), so
        a changed tokenizer gets a new map; it is written to a temporary name and renamed.
        """
        directory = Path(cache_dir).expanduser()
        name = f"vocab-map-{tokenizer_hash(teacher)[:16]}-{tokenizer_hash(student)[:16]}.npz"
        path = directory / name
        if path.is_file():
            stored = np.load(path)
            return cls(stored["teacher_to_student"], stored["student_mapped"])
        built = cls.build(TokenBytes(teacher), TokenBytes(student))
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f".{name}.{os.getpid()}.npz"
        np.savez(
            partial,
            teacher_to_student=built.teacher_to_student,
            student_mapped=built.student_mapped,
        )
        partial.replace(path)
        return built
