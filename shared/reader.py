"""Reading a dataset: shards listed in the manifest, streamed one row group at a time.

Memory stays bounded by one row group (the writer sizes them by scored positions). Every
fault is raised as ``DatasetError`` naming the shard: a listed shard that is missing, one
whose size differs from the manifest (truncated), one Parquet cannot decode, and one
altered on disk. An altered shard is never read as if it were sound:

- shards written with Parquet page checksums (``ShardEntry.page_checksums``) have every
  page's CRC-32 checked as it is read, and on open their footer's Arrow schema and
  ``DatasetInfo`` are compared with the contract and the manifest. Flipping each bit of a
  test shard in turn (tests/test_shards.py), every flip either raises or leaves the
  values read unchanged. The cost scales with what is read: a trainer rank or a cache hit
  that reads one row group pays for that row group only.
- older shards (no page checksums) have their whole file's sha256 checked against the
  manifest before their first use by this ``ShardDataset`` (and again if the file changes).

``verify=True`` (and ``distill verify``) checks the sha256 of every shard it opens.

A dataset on object storage (``s3://...``, ``shared/storage.py``) reads the same way:
Parquet fetches a shard's footer, then each row group asked for by ranged reads (its
column chunks coalesced into few requests), so nothing is downloaded whole.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .codec import decode_logprobs
from .manifest import DatasetError, Manifest, ShardEntry, read_manifest
from .record import SequenceRecord
from .schema import (
    COMPLETION_IDS,
    COMPLETION_TEXT,
    FINISH_REASON,
    KEY,
    LOGPROB_START,
    META,
    PARQUET_METADATA_KEY,
    PROMPT_IDS,
    REQUEST,
    SAMPLE_COUNTS,
    SAMPLE_IDS,
    TAIL_LOGPROB,
    TOKEN_LOGPROB,
    TOPK_IDS,
    TOPK_LOGPROBS,
    DatasetInfo,
)
from .storage import Storage, open_storage


@dataclass(frozen=True)
class RowGroupRef:
    """One row group of one shard: the unit of streaming, shuffling and sharding by rank."""

    shard: str
    index: int
    rows: int


@dataclass
class DecodedBatch:
    """A row group as flat numpy arrays (ids zero-copy from Arrow, log-probs decoded).

    Row i's scored positions are ``pos_offsets[i]:pos_offsets[i+1]`` of the [N, k] arrays;
    its prompt and completion ids are slices of the flat id arrays by their offsets. In a
    dataset with adaptive k, position j holds ``topk_counts[j]`` entries; the rest of its
    row is padding: id ``PAD_ID`` (-1, which no vocabulary has) and log-prob -inf.
    A sampled dataset's position j holds its ``topk_counts[j]`` distinct drawn ids with
    log-probs ``ln(count / N)`` (the draws' empirical distribution), padded to N the
    same way, and a tail of -inf; ``sample_counts`` [N_positions, N] holds the counts
    themselves (0 at padding). ``sample_counts`` is None for a top-k dataset.
    """

    keys: list[str]
    prompt_offsets: np.ndarray
    prompt_ids: np.ndarray
    completion_offsets: np.ndarray
    completion_ids: np.ndarray
    logprob_start: np.ndarray
    pos_offsets: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_logprob: np.ndarray
    tail_logprob: np.ndarray
    topk_counts: np.ndarray | None = None
    sample_counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def row_prompt(self, i: int) -> np.ndarray:
        return self.prompt_ids[self.prompt_offsets[i] : self.prompt_offsets[i + 1]]

    def row_completion(self, i: int) -> np.ndarray:
        return self.completion_ids[self.completion_offsets[i] : self.completion_offsets[i + 1]]

    def row_positions(self, i: int) -> slice:
        return slice(int(self.pos_offsets[i]), int(self.pos_offsets[i + 1]))

    def row_completion_positions(self, i: int) -> slice:
        """Where row ``i``'s completion tokens are scored in the flat per-position arrays
        (the scored positions may start inside the prompt: ``logprob_start``). Raises
        ValueError when scoring starts inside the completion."""
        first = len(self.row_prompt(i)) - int(self.logprob_start[i])
        if first < 0:
            raise ValueError(
                f"row {self.keys[i][:16]} is scored from token {self.logprob_start[i]}, inside "
                "its completion"
            )
        start = self.row_positions(i).start + first
        return slice(start, start + len(self.row_completion(i)))


# Remote shards a reader keeps open, each with its parsed footer: enough for a trainer
# rank whose shuffled units interleave the row groups of a few shards.
_OPEN_REMOTE_SHARDS = 8


class ShardDataset:
    """A dataset (a directory or an ``s3://`` URI) opened for reading: its manifest and
    row-group layout."""

    def __init__(self, root: str | Path | Storage) -> None:
        self.storage = open_storage(root)
        # How the user named it, for messages.
        self.root = self.storage.location
        self.manifest: Manifest = read_manifest(self.storage)
        self.info: DatasetInfo = self.manifest.info
        self._entries = {s.file: s for s in self.manifest.shards}
        self._schema = self.info.schema()
        # Shards without page checksums whose sha256 matched, by their file's stat.
        self._hashed: dict[str, tuple[int, ...]] = {}
        # Remote shards opened and checked, most recent last (see ``open_shard``).
        self._opened: OrderedDict[str, pq.ParquetFile] = OrderedDict()

    def where(self, name: str) -> str:
        """A file of the dataset, as messages name it."""
        return self.storage.where(name)

    @property
    def shards(self) -> list[ShardEntry]:
        return list(self.manifest.shards)

    def open_shard(self, name: str, *, verify: bool = False) -> pq.ParquetFile:
        """Open a listed shard after checking its size, footer schema and info (and its
        sha256 with ``verify`` or when it has no page checksums).

        A local shard is checked at every open (a stat). On object storage each check is a
        round trip, and a trainer opens a shard once per row group it reads: the last
        few remote shards opened stay open and checked, since a shard under its final
        name is never rewritten (page checksums still check every page read).
        """
        entry = self._entries.get(name)
        if entry is None:
            raise DatasetError(f"{self.where(name)}: not listed in the manifest of {self.root}")
        if not verify and name in self._opened:
            self._opened.move_to_end(name)
            return self._opened[name]
        path = self.where(name)
        try:
            stamp = self.storage.stamp(name)
        except FileNotFoundError:
            raise DatasetError(f"{path}: shard listed in the manifest is missing") from None
        if stamp[0] != entry.bytes:
            raise DatasetError(
                f"{path}: {stamp[0]} bytes stored, manifest says {entry.bytes}"
                " (truncated or replaced)"
            )
        if verify or (not entry.page_checksums and self._hashed.get(name) != stamp):
            if self.storage.sha256(name) != entry.sha256:
                raise DatasetError(
                    f"{path}: sha256 differs from the manifest (shard was altered on disk);"
                    " run `distill verify` on the dataset and recompute the shard's rows"
                )
            self._hashed[name] = stamp
        try:
            pf = pq.ParquetFile(
                self.storage.open_input(name),
                page_checksum_verification=entry.page_checksums,
                # Remote reads pay a round trip per request: fetch a row group's column
                # chunks in a few coalesced reads instead of one per column.
                pre_buffer=self.storage.remote,
            )
            schema = pf.schema_arrow
        except (pa.ArrowException, OSError) as e:
            raise DatasetError(f"{path}: cannot open as Parquet ({e})") from None
        stored = (schema.metadata or {}).get(PARQUET_METADATA_KEY)
        if not schema.remove_metadata().equals(self._schema) or stored is None:
            raise DatasetError(f"{path}: schema differs from the shard contract (altered?)")
        try:
            same_info = DatasetInfo.model_validate_json(stored) == self.info
        except ValueError:
            same_info = False
        if not same_info:
            raise DatasetError(f"{path}: its DatasetInfo differs from the manifest's (altered?)")
        if self.storage.remote:
            self._opened[name] = pf
            while len(self._opened) > _OPEN_REMOTE_SHARDS:
                self._opened.popitem(last=False)
        return pf

    def row_groups(self, shards: Sequence[str] | None = None) -> list[RowGroupRef]:
        """Every row group of the chosen shards (default: all), in manifest order."""
        refs = []
        for name in shards if shards is not None else [s.file for s in self.manifest.shards]:
            meta = self.open_shard(name).metadata
            refs += [
                RowGroupRef(name, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)
            ]
        return refs

    def read_row_group(
        self,
        ref: RowGroupRef,
        columns: Sequence[str] | None = None,
        *,
        verify: bool = False,
        opened: pq.ParquetFile | None = None,
    ) -> pa.Table:
        pf = opened or self.open_shard(ref.shard, verify=verify)
        try:
            return pf.read_row_group(ref.index, columns=list(columns) if columns else None)
        except (pa.ArrowException, OSError) as e:
            why = "altered on disk: a page checksum failed" if "CRC" in str(e) else "unreadable"
            raise DatasetError(
                f"{self.where(ref.shard)}: row group {ref.index} {why} ({e});"
                " run `distill verify` on the dataset"
            ) from None

    def iter_tables(
        self,
        refs: Iterable[RowGroupRef] | None = None,
        columns: Sequence[str] | None = None,
        *,
        verify: bool = False,
    ) -> Iterator[pa.Table]:
        # Consecutive row groups of one shard share its opened file (and its parsed footer).
        name, pf = None, None
        for ref in refs if refs is not None else self.row_groups():
            if ref.shard != name:
                name, pf = ref.shard, self.open_shard(ref.shard, verify=verify)
            yield self.read_row_group(ref, columns, opened=pf)

    def iter_decoded(
        self, refs: Iterable[RowGroupRef] | None = None, *, verify: bool = False
    ) -> Iterator[DecodedBatch]:
        for table in self.iter_tables(refs, decoded_columns(self.info), verify=verify):
            yield decode_table(table, self.info)

    def iter_records(self, *, verify: bool = False) -> Iterator[SequenceRecord]:
        """Every row as a SequenceRecord with decoded float log-probs: for inspection and
        lookups, not training (the trainer reads ``iter_decoded`` batches)."""
        for table in self.iter_tables(verify=verify):
            yield from table_records(table, self.info)


# Padding of a position that keeps fewer than k entries (adaptive k): no vocabulary has it,
# so a gather at it fails loudly instead of reading a real token's logit.
PAD_ID = -1

DECODED_COLUMNS = (
    KEY,
    PROMPT_IDS,
    COMPLETION_IDS,
    LOGPROB_START,
    TOPK_IDS,
    TOPK_LOGPROBS,
    TOKEN_LOGPROB,
    TAIL_LOGPROB,
)


def decoded_columns(info: DatasetInfo) -> tuple[str, ...]:
    """The columns ``decode_table`` reads from a dataset of ``info``."""
    if info.sampled is None:
        return DECODED_COLUMNS
    return (
        KEY,
        PROMPT_IDS,
        COMPLETION_IDS,
        LOGPROB_START,
        SAMPLE_IDS,
        SAMPLE_COUNTS,
        TOKEN_LOGPROB,
    )


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return arr.offsets.to_numpy(), arr


def decode_table(table: pa.Table, info: DatasetInfo) -> DecodedBatch:
    """Arrow table (one row group) -> DecodedBatch, copying only what must be decoded."""
    k = info.k
    p_off, p = _flat(table.column(PROMPT_IDS))
    c_off, c = _flat(table.column(COMPLETION_IDS))
    sampled = info.sampled is not None
    pos_off, ids = _flat(table.column(SAMPLE_IDS if sampled else TOPK_IDS))
    _, lps = _flat(table.column(SAMPLE_COUNTS if sampled else TOPK_LOGPROBS))
    _, tok = _flat(table.column(TOKEN_LOGPROB))
    base = int(pos_off[0])
    counts = draw_counts = None
    if sampled:
        positions = ids.flatten()
        counts = np.diff(positions.offsets.to_numpy()).astype(np.int32)
        keep = np.arange(k) < counts[:, None]
        id_values = np.full(keep.shape, PAD_ID, dtype=np.int32)
        id_values[keep] = positions.flatten().to_numpy(zero_copy_only=False)
        draw_counts = np.zeros(keep.shape, dtype=np.uint8)
        draw_counts[keep] = lps.flatten().flatten().to_numpy(zero_copy_only=False)
        with np.errstate(divide="ignore"):
            lp_values = np.log(draw_counts / np.float64(k)).astype(np.float32)
        tail_values = np.full(len(counts), -np.inf, dtype=np.float32)
    elif info.adaptive is None:
        # flatten() honours slicing, so the values start at this table's first position.
        id_values = ids.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
        lp_values = lps.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
        lp_values = decode_logprobs(lp_values, info.logprob_codec)
    else:
        positions = ids.flatten()
        counts = np.diff(positions.offsets.to_numpy()).astype(np.int32)
        keep = np.arange(k) < counts[:, None]
        id_values = np.full(keep.shape, PAD_ID, dtype=np.int32)
        id_values[keep] = positions.flatten().to_numpy(zero_copy_only=False)
        lp_values = np.full(keep.shape, -np.inf, dtype=np.float32)
        stored = lps.flatten().flatten().to_numpy(zero_copy_only=False)
        lp_values[keep] = decode_logprobs(stored, info.logprob_codec)
    if not sampled:
        tail_values = _flat(table.column(TAIL_LOGPROB))[1].flatten().to_numpy(zero_copy_only=False)
    return DecodedBatch(
        keys=table.column(KEY).to_pylist(),
        prompt_offsets=p_off - p_off[0],
        prompt_ids=p.flatten().to_numpy(zero_copy_only=False),
        completion_offsets=c_off - c_off[0],
        completion_ids=c.flatten().to_numpy(zero_copy_only=False),
        logprob_start=table.column(LOGPROB_START).to_numpy(),
        pos_offsets=pos_off - base,
        topk_ids=id_values,
        topk_logprobs=lp_values,
        token_logprob=tok.flatten().to_numpy(zero_copy_only=False),
        tail_logprob=tail_values,
        topk_counts=counts,
        sample_counts=draw_counts,
    )


def verify_dataset(root: str | Path) -> tuple[list[str], list[str]]:
    """Check every shard against the manifest and the schema.

    Returns (faults, notes). Faults: missing, truncated, altered or unreadable shards, a
    schema or row count that differs from the manifest. Notes: files the manifest does
    not list (left by a writer that died before publishing; never read).
    """
    try:
        ds = ShardDataset(root)
    except DatasetError as e:
        return [str(e)], []
    faults: list[str] = []
    for entry in ds.manifest.shards:
        path = ds.where(entry.file)
        try:
            pf = ds.open_shard(entry.file, verify=True)
            if pf.metadata.num_rows != entry.rows:
                faults.append(f"{path}: {pf.metadata.num_rows} rows, manifest says {entry.rows}")
            for i in range(pf.metadata.num_row_groups):
                pf.read_row_group(i)
        except DatasetError as e:
            faults.append(str(e))
        except (pa.ArrowException, OSError, ValueError) as e:
            faults.append(f"{path}: unreadable ({e})")
    listed = {s.file for s in ds.manifest.shards}
    names = ds.storage.names()
    notes = [
        f"{ds.where(n)}: not listed in the manifest (an unpublished write; never read)"
        for n in names
        if n.endswith(".parquet") and not n.startswith(".") and n not in listed
    ] + [
        f"{ds.where(n)}: temporary file of an interrupted write"
        for n in names
        if n.startswith(".") and n.endswith(".tmp")
    ]
    return faults, notes


def table_records(table: pa.Table, info: DatasetInfo) -> Iterator[SequenceRecord]:
    """The rows of a shard table (any slice of it) as SequenceRecords: the one place a
    whole row is decoded."""
    batch = decode_table(table, info)
    texts = table.column(COMPLETION_TEXT).to_pylist()
    finish = table.column(FINISH_REASON).to_pylist()
    requests = table.column(REQUEST).to_pylist()
    metas = table.column(META).to_pylist()
    for i in range(len(batch)):
        pos = batch.row_positions(i)
        yield SequenceRecord(
            key=batch.keys[i],
            prompt_ids=batch.row_prompt(i).copy(),
            completion_ids=batch.row_completion(i).copy(),
            topk_ids=batch.topk_ids[pos].copy(),
            topk_logprobs=batch.topk_logprobs[pos].copy(),
            token_logprob=batch.token_logprob[pos].copy(),
            tail_logprob=batch.tail_logprob[pos].copy(),
            completion_text=texts[i],
            logprob_start=int(batch.logprob_start[i]),
            finish_reason=finish[i],
            request=json.loads(requests[i]) if requests[i] else {},
            meta=json.loads(metas[i]) if metas[i] else {},
        )
