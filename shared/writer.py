"""ShardWriter: records in, crash-safe zstd Parquet shards and a manifest out.

A shard is written under a hidden temporary name, fsynced, renamed to its final name,
and only then listed in the manifest (itself replaced atomically). A reader, which reads
only what the manifest lists, therefore never sees a half-written shard, whatever moment
the writer dies at.
"""

from __future__ import annotations

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
from .manifest import ShardEntry, fsync_dir, locked_manifest
from .record import SequenceRecord
from .schema import PARQUET_METADATA_KEY, DatasetInfo, parquet_options, shard_schema


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
    """Appends records to a dataset directory, rotating shards by rows or bytes.

    Rows are buffered into row groups of about ``row_group_tokens`` scored positions (the
    unit the trainer streams, so it bounds reader memory). A shard is closed and published
    once it holds ``max_shard_rows`` rows or ``max_shard_bytes`` bytes, on ``flush()``, and
    on ``close()``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        info: DatasetInfo,
        *,
        writer_id: str | None = None,
        max_shard_rows: int = 100_000,
        max_shard_bytes: int = 256 << 20,
        row_group_tokens: int = 65_536,
        compression_level: int = 3,
    ) -> None:
        self.root = Path(root)
        self.info = info
        self.writer_id = writer_id or default_writer_id()
        self.max_shard_rows = max_shard_rows
        self.max_shard_bytes = max_shard_bytes
        self.row_group_tokens = row_group_tokens
        self.compression_level = compression_level
        self.schema = shard_schema(info.k, info.logprob_codec).with_metadata(
            {PARQUET_METADATA_KEY: info.to_json().encode()}
        )
        # Checks compatibility with an existing dataset before any work is done.
        with locked_manifest(self.root, info) as manifest:
            self._seq = sum(1 for s in manifest.shards if s.writer_id == self.writer_id)
        self._buffer: list[SequenceRecord] = []
        self._buffer_tokens = 0
        self._pq: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._shard_rows = 0
        self._shard_tokens = 0
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

    def flush(self) -> ShardEntry | None:
        """Publish everything written so far as a shard (None when nothing is pending)."""
        self._write_row_group()
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
        """Drop the shard in progress; what was published stays."""
        if self._pq is not None:
            self._pq.close()
            self._pq = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        self._buffer.clear()
        self._buffer_tokens = 0

    def _write_row_group(self) -> None:
        if not self._buffer:
            return
        table = records_to_table(self._buffer, self.schema, self.info)
        if self._pq is None:
            self._tmp = self.root / f".{self._name()}.tmp"
            self._pq = pq.ParquetWriter(
                self._tmp,
                self.schema,
                compression="zstd",
                compression_level=self.compression_level,
                **parquet_options(self.info.logprob_codec),
                write_statistics=["key", "logprob_start"],
            )
        self._pq.write_table(table, row_group_size=len(self._buffer))
        self._shard_rows += len(self._buffer)
        self._shard_tokens += self._buffer_tokens
        self._buffer.clear()
        self._buffer_tokens = 0
        if (
            self._shard_rows >= self.max_shard_rows
            or self._tmp.stat().st_size >= self.max_shard_bytes
        ):
            self._publish()

    def _publish(self) -> ShardEntry | None:
        if self._pq is None:
            return None
        self._pq.close()
        self._pq = None
        tmp, self._tmp = self._tmp, None
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = self.root / self._name()
        entry = ShardEntry(
            file=final.name,
            rows=self._shard_rows,
            tokens=self._shard_tokens,
            bytes=tmp.stat().st_size,
            sha256=file_sha256(tmp),
            writer_id=self.writer_id,
            created=time.time(),
        )
        os.replace(tmp, final)
        fsync_dir(self.root)
        with locked_manifest(self.root, self.info) as manifest:
            manifest.shards.append(entry)
        self._seq += 1
        self._shard_rows = 0
        self._shard_tokens = 0
        self.published.append(entry)
        return entry

    def _name(self) -> str:
        return f"part-{self.writer_id}-{self._seq:05d}.parquet"


def records_to_table(
    records: list[SequenceRecord], schema: pa.Schema, info: DatasetInfo
) -> pa.Table:
    """Canonicalize and encode a batch of records as one Arrow table (no per-token Python)."""
    k = info.k
    n_scored = np.fromiter((r.n_scored for r in records), dtype=np.int64, count=len(records))
    pos_offsets = np.zeros(len(records) + 1, dtype=np.int32)
    np.cumsum(n_scored, out=pos_offsets[1:])
    raw = np.concatenate([r.topk_logprobs for r in records])
    tails = np.concatenate([r.tail_logprob for r in records])
    # Encoding is per entry, so it commutes with the sort by id; sorting the encoded
    # values moves fewer bytes.
    ids, stored = canonical_topk(
        np.concatenate([r.topk_ids for r in records]), encode_logprobs(raw, info.logprob_codec)
    )
    offsets = pa.array(pos_offsets, type=pa.int32())

    def per_position(flat: np.ndarray, field: str) -> pa.Array:
        typ = schema.field(field).type
        return pa.ListArray.from_arrays(offsets, pa.array(flat, type=typ.value_type))

    def per_entry(flat: np.ndarray, field: str) -> pa.Array:
        typ = schema.field(field).type
        inner = pa.FixedSizeListArray.from_arrays(
            pa.array(flat.reshape(-1), type=typ.value_type.value_type), k
        )
        return pa.ListArray.from_arrays(offsets, inner)

    def id_lists(arrays: list[np.ndarray]) -> pa.Array:
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        offs = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offs[1:])
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        return pa.ListArray.from_arrays(pa.array(offs), pa.array(flat, type=pa.int32()))

    columns = {
        "key": pa.array([r.key for r in records], type=pa.string()),
        "prompt_ids": id_lists([r.prompt_ids for r in records]),
        "completion_ids": id_lists([r.completion_ids for r in records]),
        "completion_text": pa.array([r.completion_text for r in records], type=pa.string()),
        "logprob_start": pa.array([r.logprob_start for r in records], type=pa.int32()),
        "topk_ids": per_entry(ids, "topk_ids"),
        "topk_logprobs": per_entry(stored, "topk_logprobs"),
        "token_logprob": per_position(
            np.concatenate([r.token_logprob for r in records]), "token_logprob"
        ),
        "tail_logprob": per_position(tails, "tail_logprob"),
        "finish_reason": pa.array([r.finish_reason for r in records], type=pa.string()),
        "request": pa.array([r.request_json() for r in records], type=pa.string()),
        "meta": pa.array([r.meta_json() for r in records], type=pa.string()),
    }
    return pa.Table.from_pydict(columns, schema=schema)
