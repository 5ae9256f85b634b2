"""ShardWriter: records in, crash-safe zstd Parquet shards and a manifest out.

A shard is written under a hidden temporary name, fsynced, placed under its final name
(renamed, and the directory fsynced; on object storage uploaded, which is invisible until
complete), and only then listed in the manifest (itself replaced atomically, or committed
by a conditional write: ``shared/storage.py``). A reader, which reads only what the
manifest lists, therefore never sees a half-written shard, whatever moment the writer
dies at. The same code writes local and remote datasets; ``Storage`` does the few steps
that differ.

A failed write (disk full, an I/O error) at any of those steps loses nothing and never
lies: the encoded rows of the shard in progress stay in memory until a manifest lists
them, so the next ``flush()`` rewrites the shard from them; a shard renamed but not yet
listed is listed by the next successful publish; a final name, once renamed to, is never
written again; the manifest only ever names complete, fsynced shards with their true row
counts. The price is memory: the unpublished shard's rows, about 2-3x its compressed size
(bounded by ``max_shard_bytes``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import socket
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .codec import canonical_topk, encode_logprobs
from .manifest import Manifest, ShardEntry, existing_manifest, quarantined_name, update_manifest
from .record import SequenceRecord
from .schema import (
    SAMPLE_COUNTS,
    SAMPLE_IDS,
    TAIL_LOGPROB,
    TOPK_IDS,
    TOPK_LOGPROBS,
    AdaptiveK,
    DatasetInfo,
    parquet_options,
    shard_metadata,
)
from .storage import Storage, open_storage


def default_writer_id() -> str:
    """Unique per process and host, so replicas sharing a directory never collide."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Appends records to a dataset (a directory or an ``s3://`` URI), rotating shards by rows or bytes.

    Rows are buffered into row groups of about ``row_group_tokens`` scored positions (the
    unit the trainer streams, so it bounds reader memory). A shard is closed and published
    once it holds ``max_shard_rows`` rows or ``max_shard_bytes`` bytes, on ``flush()``, and
    on ``close()``.

    ``write`` accepts the record before it does any I/O: when it raises ``OSError`` the
    record is pending all the same, and a later ``flush()`` publishes it.
    """

    def __init__(
        self,
        root: str | os.PathLike | Storage,
        info: DatasetInfo,
        *,
        writer_id: str | None = None,
        max_shard_rows: int = 100_000,
        max_shard_bytes: int = 256 << 20,
        row_group_tokens: int = 65_536,
        compression_level: int = 3,
        cut: bool = True,
    ) -> None:
        self.storage = open_storage(root)
        self.info = info
        self.writer_id = writer_id or default_writer_id()
        self.max_shard_rows = max_shard_rows
        self.max_shard_bytes = max_shard_bytes
        self.row_group_tokens = row_group_tokens
        self.compression_level = compression_level
        # False: records were cut by this dataset's adaptive rule already (an export); keep
        # each position's finite entries as they are instead of cutting again.
        self.cut = cut
        self.schema = info.schema().with_metadata(shard_metadata(info))
        # Checks compatibility with an existing dataset before any work is done; creates
        # nothing: a dataset appears with its first published shard, so a run that fails
        # before it leaves nothing that would fix k or the teacher for the next.
        existing = existing_manifest(self.storage, info)
        self._taken = {s.file for s in existing.shards} if existing else set()
        self._seq = 0
        self._buffer: list[SequenceRecord] = []
        self._buffer_tokens = 0
        # The shard in progress: its encoded row groups (kept until a manifest lists them,
        # so a failed write can be redone) and how many of them the open file holds.
        self._tables: list[pa.Table] = []
        self._in_file = 0
        self._pq: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._shard_rows = 0
        self._shard_tokens = 0
        # Shards renamed to their final name whose manifest update has not succeeded yet.
        self._unlisted: list[ShardEntry] = []
        self.published: list[ShardEntry] = []

    def write(self, record: SequenceRecord) -> None:
        if record.topk_ids.shape[1] != self.info.k:
            raise ValueError(
                f"record {record.key[:16]}: top-k width {record.topk_ids.shape[1]},"
                f" dataset k={self.info.k}"
            )
        self._buffer.append(record)
        self._buffer_tokens += record.n_scored
        full_shard = self._shard_rows + len(self._buffer) >= self.max_shard_rows
        if full_shard or self._buffer_tokens >= self.row_group_tokens:
            self._write_row_group()

    def write_many(self, records: Iterable[SequenceRecord]) -> None:
        for record in records:
            self.write(record)

    @property
    def pending_rows(self) -> int:
        """Rows accepted but not yet listed in the manifest."""
        return len(self._buffer) + self._shard_rows + sum(e.rows for e in self._unlisted)

    def flush(self) -> ShardEntry | None:
        """Publish everything written so far; returns the last shard listed (None if none).

        After an ``OSError`` every row is still pending; calling ``flush()`` again (once
        the disk has room) publishes them.
        """
        self._write_row_group(rotate=False)
        return self._publish()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the rows not yet in a published file; what was published stays."""
        self._discard_file()
        self._tables.clear()
        self._shard_rows = 0
        self._shard_tokens = 0
        self._buffer.clear()
        self._buffer_tokens = 0

    def _write_row_group(self, *, rotate: bool = True) -> None:
        if self._buffer:
            self._tables.append(
                records_to_table(self._buffer, self.schema, self.info, cut=self.cut)
            )
            self._shard_rows += len(self._buffer)
            self._shard_tokens += self._buffer_tokens
            self._buffer.clear()
            self._buffer_tokens = 0
        self._write_tables()
        if (
            rotate
            and self._tables
            and (
                self._shard_rows >= self.max_shard_rows
                or self._tmp.stat().st_size >= self.max_shard_bytes
            )
        ):
            self._publish()

    def _write_tables(self) -> None:
        """Bring the temporary file up to date with ``_tables``; on failure drop the file."""
        try:
            if self._pq is None and self._tables:
                self._tmp = self.storage.staging() / f".{self._name()}.tmp"
                self._pq = pq.ParquetWriter(
                    self._tmp,
                    self.schema,
                    compression="zstd",
                    compression_level=self.compression_level,
                    **parquet_options(
                        self.info.logprob_codec, sampled=self.info.sampled is not None
                    ),
                    write_statistics=["key", "logprob_start"],
                    write_page_checksum=True,
                )
            for table in self._tables[self._in_file :]:
                self._pq.write_table(table, row_group_size=table.num_rows)
                self._in_file += 1
        except OSError:
            self._discard_file()
            raise

    def _publish(self) -> ShardEntry | None:
        if self._tables:
            self._finish_shard()
        if not self._unlisted:
            return None
        self.storage.sync()

        def add(manifest: Manifest) -> None:
            listed = {s.file for s in manifest.shards}
            # A manifest update that failed after its rename may already list some.
            manifest.shards.extend(e for e in self._unlisted if e.file not in listed)

        update_manifest(self.storage, self.info, add)
        self.published += self._unlisted
        self._unlisted = []
        return self.published[-1]

    def _finish_shard(self) -> None:
        """Close, fsync and place the shard in progress; it becomes unlisted, not pending."""
        self._write_tables()
        try:
            self._pq.close()
            with open(self._tmp, "rb+") as f:
                os.fsync(f.fileno())
            final = self._name()
            entry = ShardEntry(
                file=final,
                rows=self._shard_rows,
                tokens=self._shard_tokens,
                bytes=self._tmp.stat().st_size,
                sha256=file_sha256(self._tmp),
                writer_id=self.writer_id,
                created=time.time(),
                page_checksums=True,
            )
            self.storage.place(self._tmp, final)
        except OSError:
            self._discard_file()
            raise
        self._taken.add(final)
        self._pq, self._tmp, self._in_file = None, None, 0
        self._tables.clear()
        self._shard_rows = 0
        self._shard_tokens = 0
        self._unlisted.append(entry)

    def _discard_file(self) -> None:
        """Forget the temporary file (its rows stay in ``_tables``); never raises."""
        if self._pq is not None:
            with contextlib.suppress(Exception):
                self._pq.close()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.unlink(missing_ok=True)
        self._pq, self._tmp, self._in_file = None, None, 0

    def _name(self) -> str:
        """The next final name no shard has had: not listed, not stored (quarantined
        included), not used here."""
        while True:
            name = f"part-{self.writer_id}-{self._seq:05d}.parquet"
            if (
                name not in self._taken
                and not self.storage.exists(name)
                and not self.storage.exists(quarantined_name(name))
            ):
                return name
            self._seq += 1


def adaptive_counts(raw: np.ndarray, rule: AdaptiveK) -> tuple[np.ndarray, np.ndarray]:
    """Entries each position keeps under ``rule``, and the log of the mass it drops.

    ``raw`` [N, k] exact log-probs in any order. Returns (counts [N] int, dropped [N]
    float32, -inf where nothing is dropped). The kept entries are each position's most
    likely (of equal ones, the first in ``raw``).
    """
    k = raw.shape[1]
    p = np.exp(-np.sort(-raw.astype(np.float64), axis=1))
    wanted = np.zeros(len(raw), dtype=np.int64)
    if rule.mass is not None:
        # Entries before the one that brings the kept mass to ``mass``, plus that one.
        wanted = np.maximum(wanted, (np.cumsum(p, axis=1) < rule.mass).sum(axis=1) + 1)
    if rule.min_prob is not None:
        wanted = np.maximum(wanted, (p >= rule.min_prob).sum(axis=1))
    # Never more than the finite entries: a row read from a dataset cut by a wider rule
    # is padded with -inf, which is no entry.
    counts = np.minimum(np.clip(wanted, rule.min_k, k), np.isfinite(raw).sum(axis=1))
    with np.errstate(divide="ignore"):
        dropped = np.log(np.where(np.arange(k) >= counts[:, None], p, 0.0).sum(axis=1))
    return counts, dropped.astype(np.float32)


def adaptive_cut(record: SequenceRecord, rule: AdaptiveK) -> SequenceRecord:
    """``record`` as a dataset with ``rule`` stores it: each position's kept entries first
    (most likely first), the rest padded (id ``PAD_ID``, log-prob -inf, as
    ``shared.reader`` decodes them) and their mass added to the tail. Cutting a cut record
    again with the same rule changes nothing."""
    from .reader import PAD_ID  # here: the reader imports this module

    raw = record.topk_logprobs
    counts, dropped = adaptive_counts(raw, rule)
    order = np.argsort(-raw, axis=1, kind="stable")
    keep = np.arange(raw.shape[1]) < counts[:, None]
    ids = np.where(keep, np.take_along_axis(record.topk_ids, order, axis=1), PAD_ID)
    lps = np.where(keep, np.take_along_axis(raw, order, axis=1), -np.inf).astype(np.float32)
    with np.errstate(divide="ignore"):
        tail = np.logaddexp(record.tail_logprob, dropped).astype(np.float32)
    return dataclasses.replace(
        record, topk_ids=ids.astype(np.int32), topk_logprobs=lps, tail_logprob=tail
    )


def records_to_table(
    records: list[SequenceRecord], schema: pa.Schema, info: DatasetInfo, *, cut: bool = True
) -> pa.Table:
    """Canonicalize and encode a batch of records as one Arrow table (no per-token Python).

    With adaptive k, ``cut`` applies the dataset's rule; ``cut=False`` keeps each
    position's finite entries (records read from a dataset with this rule, padded -inf).
    """
    k = info.k
    n_scored = np.fromiter((r.n_scored for r in records), dtype=np.int64, count=len(records))
    pos_offsets = np.zeros(len(records) + 1, dtype=np.int32)
    np.cumsum(n_scored, out=pos_offsets[1:])
    raw = np.concatenate([r.topk_logprobs for r in records])
    raw_ids = np.concatenate([r.topk_ids for r in records])
    if info.sampled is not None:
        ids, draw_counts, counts = sample_entries(raw_ids, raw, info.sampled.draws, records)
    else:
        ids, stored, counts, tails = _topk_entries(raw_ids, raw, info, records, cut)
    offsets = pa.array(pos_offsets, type=pa.int32())

    def per_position(flat: np.ndarray, field: str) -> pa.Array:
        typ = schema.field(field).type
        return pa.ListArray.from_arrays(offsets, pa.array(flat, type=typ.value_type))

    entry_offsets = None
    if counts is not None:
        entry_offsets = np.zeros(len(counts) + 1, dtype=np.int32)
        np.cumsum(counts, out=entry_offsets[1:])
        entry_offsets = pa.array(entry_offsets)
        kept = np.arange(k) < counts[:, None]

    def per_entry(flat: np.ndarray, field: str) -> pa.Array:
        typ = schema.field(field).type
        value_type = typ.value_type.value_type
        if entry_offsets is None:
            inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), value_type), k)
        else:
            inner = pa.ListArray.from_arrays(entry_offsets, pa.array(flat[kept], value_type))
        return pa.ListArray.from_arrays(offsets, inner)

    def id_lists(arrays: list[np.ndarray]) -> pa.Array:
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        offs = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offs[1:])
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        return pa.ListArray.from_arrays(pa.array(offs), pa.array(flat, type=pa.int32()))

    if info.sampled is not None:
        entries = {
            SAMPLE_IDS: per_entry(ids, SAMPLE_IDS),
            SAMPLE_COUNTS: per_entry(draw_counts, SAMPLE_COUNTS),
        }
    else:
        entries = {
            TOPK_IDS: per_entry(ids, TOPK_IDS),
            TOPK_LOGPROBS: per_entry(stored, TOPK_LOGPROBS),
        }
    columns = {
        "key": pa.array([r.key for r in records], type=pa.string()),
        "prompt_ids": id_lists([r.prompt_ids for r in records]),
        "completion_ids": id_lists([r.completion_ids for r in records]),
        "completion_text": pa.array([r.completion_text for r in records], type=pa.string()),
        "logprob_start": pa.array([r.logprob_start for r in records], type=pa.int32()),
        **entries,
        "token_logprob": per_position(
            np.concatenate([r.token_logprob for r in records]), "token_logprob"
        ),
        "finish_reason": pa.array([r.finish_reason for r in records], type=pa.string()),
        "request": pa.array([r.request_json() for r in records], type=pa.string()),
        "meta": pa.array([r.meta_json() for r in records], type=pa.string()),
    }
    if info.sampled is None:
        columns[TAIL_LOGPROB] = per_position(tails, TAIL_LOGPROB)
    return pa.Table.from_pydict({f.name: columns[f.name] for f in schema}, schema=schema)


def sample_entries(
    ids: np.ndarray, logprobs: np.ndarray, draws: int, records: list[SequenceRecord]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampled positions in memory form (ids with log-probs ``ln(count / N)``, padded with
    -1 / -inf) -> (ids sorted ascending, padding last; one-byte counts alongside; distinct
    ids per position). Raises ValueError naming the record whose counts do not sum to N:
    such a position is not ``draws`` draws."""
    with np.errstate(over="ignore"):
        counts = np.rint(np.exp(logprobs.astype(np.float64)) * draws)
    present = counts > 0
    totals = counts.sum(axis=1)
    bad = np.flatnonzero((totals != draws) | (present & (ids < 0)).any(axis=1))
    if len(bad):
        ends = np.cumsum([r.n_scored for r in records])
        record = records[int(np.searchsorted(ends, bad[0], side="right"))]
        raise ValueError(
            f"record {record.key[:16]}: a sampled position's counts sum to"
            f" {int(totals[bad[0]])}, not the dataset's {draws} draws (entries must be"
            " ln(count / N) at distinct ids)"
        )
    ordered = np.where(present, ids, np.iinfo(np.int32).max)
    sorted_ids, sorted_counts = canonical_topk(ordered, counts.astype(np.uint8))
    return sorted_ids, sorted_counts, present.sum(axis=1)


def _topk_entries(
    raw_ids: np.ndarray,
    raw: np.ndarray,
    info: DatasetInfo,
    records: list[SequenceRecord],
    cut: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Top-k positions -> (ids sorted ascending, stored log-prob codes alongside, entries
    kept per position with adaptive k (None: all k), tails)."""
    k = info.k
    # Every record carries its tail (SequenceRecord computes it, or a backend gave a more
    # exact one).
    tails = np.concatenate([r.tail_logprob for r in records])
    counts = None
    if info.adaptive is not None:
        if cut:
            counts, dropped = adaptive_counts(raw, info.adaptive)
        else:
            counts = np.isfinite(raw).sum(axis=1)
            dropped = np.full(len(raw), -np.inf, dtype=np.float32)
        # The dropped entries join the tail; they sort last (id past any vocabulary).
        with np.errstate(divide="ignore"):
            tails = np.logaddexp(tails, dropped).astype(np.float32)
        rank = np.empty(raw.shape, dtype=np.int64)
        np.put_along_axis(
            rank, np.argsort(-raw, axis=1, kind="stable"), np.arange(k)[None, :], axis=1
        )
        keep = rank < counts[:, None]
        raw_ids = np.where(keep, raw_ids, np.iinfo(np.int32).max)
    # Encoding is per entry, so it commutes with the sort by id; sorting the encoded
    # values moves fewer bytes.
    ids, stored = canonical_topk(raw_ids, encode_logprobs(raw, info.logprob_codec))
    return ids, stored, counts, tails
