"""The teacher's store: the datasets under the data root, their writers, and cache lookups.

Layout of a data root::

    <data_root>/<dataset>/.manifest.json, part-*.parquet  one directory per dataset
    <data_root>/.distill/index.sqlite                     the cache index (rebuildable)
    <data_root>/.distill/jobs.sqlite                      batch job state
    <data_root>/...                                       input files, anywhere

Which dataset an answer goes to. A dataset has one k and one log-prob codec, so:

- a batch job writes to the dataset it names (any k; the dataset's first writer fixes it);
- a live request (HTTP generate/score with ``store``) goes to the live dataset of its k,
  ``live-<model>-<hash>-k<k>``, where the hash covers the teacher model, revision and
  tokenizer so two teachers never share one. Sampling parameters vary per request there;
  each row's ``request`` column holds them.

Lookups do not care which dataset holds a key, only how exactly it stores log-probs: the
key already pins the teacher's weights and numerics, the tokenizer, the prompt, k and the
sampling, so any dataset's row is the right answer, provided its codec is at least as
exact as the one this store writes (``as_exact_codecs``) and it kept every entry this
store's adaptive-k rule keeps (``adaptive_answers``: a full top-k row answers any rule,
a row cut by a rule only a rule it covers, never a store that keeps the full top-k).
Like the codec, the rule is a property of how answers are stored, not of the teacher's
answer, so it is not in the key: a full top-k row answers an adaptive store without
running the teacher again. Every answer this store gives is cut by its rule
(``shape``), so a fresh answer reads as its cached copy will.
A store in sampled mode (``sampled``, RS-KD draws instead of the top-k) is different:
the draws are the teacher's answer, so the mode is in the key (``Query.in_mode``) and a
sampled answer never meets a top-k query, nor a top-k row a sampled one; every dataset
it writes is a sampled one, k being the draw count whatever k a job or request names.
Besides the data root's datasets, read-only *sources* (``--cache-sources``: datasets on
object storage, e.g. the output of a capture run on a cluster, or directories elsewhere)
answer lookups too, under the same rules; they are indexed under their URI as name and
never written, and a damaged shard in one is left out of the index, not quarantined (the
store cannot change a dataset it only reads).

Flush policy. Stored rows first sit in the dataset's ShardWriter buffer and in a
``pending`` map that answers lookups from memory. Once a dataset has ``flush_rows``
pending rows, or its oldest pending row is ``flush_seconds`` old (checked by
``flush_due``, which the service calls every second and a job after every step), the
writer publishes them as a shard (fsync, rename, manifest) and the index learns them.
A crash loses at most the pending rows, never a published one; a resumed job recomputes
exactly those.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from distillcache.shared.manifest import DatasetError, find_manifest, read_manifest
from distillcache.shared.record import SequenceRecord
from distillcache.shared.repair import rebuild_manifest
from distillcache.shared.schema import (
    READABLE_SCHEMA_VERSIONS,
    AdaptiveK,
    DatasetInfo,
    LogprobCodec,
    SampledLogits,
    Sampling,
    adaptive_answers,
    as_exact_codecs,
)
from distillcache.shared.storage import is_uri
from distillcache.shared.writer import ShardWriter, adaptive_cut

from .identity import TeacherIdentity
from .index import CacheIndex

log = logging.getLogger(__name__)

STATE_DIR = ".distill"
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# How often a lookup that missed may re-read the manifests for shards other processes
# (teacher replicas, a `distill cache` run) published meanwhile.
_REFRESH_INTERVAL_S = 1.0


@dataclass
class Answer:
    """A teacher's answer to one query: the shard row, whether it came from the store
    (the teacher did not run), and the dataset holding it (None: not stored)."""

    record: SequenceRecord
    cached: bool
    dataset: str | None


def _repair_torn_manifest(path: Path) -> bool:
    """A manifest that is no longer valid JSON (or no longer a manifest), beside shards, is
    rebuilt from the shards' own metadata (shared/repair.py) before the dataset is opened.
    A manifest of a schema version this code cannot read is left alone."""
    found = find_manifest(path)
    if found is None or not any(path.glob("part-*.parquet")):
        return False
    try:
        read_manifest(path)
        return False
    except DatasetError as e:
        try:
            data = json.loads(found.read_text())
            torn = not isinstance(data, dict) or (
                data.get("schema_version") in READABLE_SCHEMA_VERSIONS
            )
        except (ValueError, OSError):
            torn = True
        if not torn:
            return False
        log.error("%s: %s; rebuilding the manifest from the shards", path, e)
    rebuild_manifest(path)
    return True


def check_dataset_name(name: str) -> str:
    """A dataset name is one plain path component: letters, digits, ``.``, ``_``, ``-``."""
    if not _DATASET_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"dataset name {name!r} must be one path component of letters, digits, '.', '_'"
            " or '-' (at most 128), starting with a letter or digit"
        )
    return name


@dataclass
class _OpenDataset:
    writer: ShardWriter
    pending: dict[str, SequenceRecord] = field(default_factory=dict)
    oldest: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class TeacherStore:
    """Datasets of one data root, written by one teacher; thread-safe, blocking I/O.

    The async service calls it through ``asyncio.to_thread``.
    """

    def __init__(
        self,
        data_root: Path,
        identity: TeacherIdentity,
        *,
        codec: LogprobCodec,
        flush_rows: int,
        flush_seconds: float,
        row_group_tokens: int,
        sources: Sequence[str] = (),
        adaptive: AdaptiveK | None = None,
        sampled: SampledLogits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``sources``: read-only datasets (``s3://`` URIs or directories) whose rows
        answer lookups too. ``adaptive``: the adaptive-k rule of every dataset this store
        writes (None: the full top-k). ``sampled``: draw every answer instead (module
        docstring). ``clock`` gives the seconds the flush policy and
        index refreshes measure; tests pass a clock they advance themselves."""
        self.data_root = Path(data_root).resolve()
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.codec: LogprobCodec = codec
        self._exact_codecs = as_exact_codecs(codec)
        self.adaptive = adaptive
        self.sampled = sampled
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.row_group_tokens = row_group_tokens
        self.state_dir = self.data_root / STATE_DIR
        self.index = CacheIndex(self.data_root, self.state_dir / "index.sqlite", sources=sources)
        self.index.refresh()
        self._open: dict[str, _OpenDataset] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._refreshed = clock()

    def dataset_path(self, name: str) -> Path | str:
        """The dataset's directory, which must be a real directory inside the data root:
        resolved at every open, so a name later swapped for a symlink leads nowhere. A
        dataset on object storage is named by its URI (a scale-out worker's output)."""
        if is_uri(name):
            return name
        path = self.data_root / check_dataset_name(name)
        if path.is_symlink() or not path.resolve().is_relative_to(self.data_root):
            raise DatasetError(f"{path}: a dataset must be a directory inside the data root")
        return path

    def open_dataset(self, name: str, k: int, sampling: Sampling | None) -> None:
        """Get ``name`` ready for writing (created when new).

        Raises DatasetError when the directory holds a dataset made by another teacher,
        tokenizer, k or codec; opening an already open dataset does nothing.
        """
        if self.sampled is not None:
            k = self.sampled.draws
        with self._lock:
            if name in self._open:
                if self._open[name].writer.info.k != k:
                    raise ValueError(
                        f"dataset {name} holds k={self._open[name].writer.info.k}, not k={k}"
                    )
                return
            info = self.dataset_info(k, sampling)
            if is_uri(name):
                # Indexed like a read-only source, so its published keys are skipped too.
                self.index.add_source(name)
            elif _repair_torn_manifest(self.dataset_path(name)):
                self.index.refresh_dataset(name)
            writer = ShardWriter(
                self.dataset_path(name), info, row_group_tokens=self.row_group_tokens
            )
            self._open[name] = _OpenDataset(writer)

    def dataset_info(self, k: int, sampling: Sampling | None) -> DatasetInfo:
        """What a dataset of this store's answers of width ``k`` records."""
        return self.identity.dataset_info(k, self.codec, sampling, self.adaptive, self.sampled)

    def open_live_dataset(self, k: int) -> str:
        name = self.identity.live_dataset(k, self.adaptive, self.sampled)
        self.open_dataset(name, k, None)
        return name

    def put(self, name: str, records: Iterable[SequenceRecord]) -> int:
        """Append records to an open dataset, skipping keys it already holds; returns how
        many were added. Publishes a shard once ``flush_rows`` rows are pending."""
        ds = self._open[name]
        records = list(records)
        with ds.lock:
            stored = self.index.contains(name, [r.key for r in records])
            added = 0
            for record in records:
                if record.key in ds.pending or record.key in stored:
                    continue
                # Pending first: the writer holds a record from the moment write() is
                # called, even when flushing its row group then fails (a full disk).
                ds.pending[record.key] = record
                ds.writer.write(record)
                added += 1
            if added and ds.oldest is None:
                ds.oldest = self._clock()
            if len(ds.pending) >= self.flush_rows:
                self._publish(name, ds)
        return added

    def contains(self, name: str, keys: Iterable[str]) -> set[str]:
        """Keys that dataset ``name`` holds, published or pending."""
        keys = list(keys)
        ds = self._open.get(name)
        pending = set()
        if ds is not None:
            with ds.lock:
                pending = {k for k in keys if k in ds.pending}
        return pending | self.index.contains(name, [k for k in keys if k not in pending])

    def lookup(self, keys: Iterable[str]) -> dict[str, Answer]:
        """Stored answers for those of ``keys`` that a dataset holds whose codec is at least
        as exact as this store's and whose rows keep what its adaptive-k rule keeps: a
        float32 dataset is never filled from one-byte codes, nor a full top-k from cut
        rows. The rows are as stored; ``shape`` cuts them by this store's rule."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, Answer] = {}
        with self._lock:
            open_now = list(self._open.items())
        for name, ds in open_now:
            info = ds.writer.info
            if (
                info.logprob_codec not in self._exact_codecs
                or not adaptive_answers(info.adaptive, self.adaptive)
                or info.sampled != self.sampled
            ):
                continue
            with ds.lock:
                for key in keys:
                    if key not in found and key in ds.pending:
                        found[key] = Answer(ds.pending[key], True, name)
        missing = [k for k in keys if k not in found]
        found.update(self._fetch(missing))
        missing = [k for k in missing if k not in found]
        if missing and self._clock() - self._refreshed >= _REFRESH_INTERVAL_S:
            self._refreshed = self._clock()
            self.index.refresh()
            found.update(self._fetch(missing))
        return found

    def _fetch(self, keys: list[str]) -> dict[str, Answer]:
        return {
            key: Answer(record, True, dataset)
            for key, (dataset, record) in self.index.fetch(
                keys, self._exact_codecs, self.adaptive
            ).items()
        }

    def shape(self, record: SequenceRecord) -> SequenceRecord:
        """``record`` as this store keeps it: cut by its adaptive-k rule, if it has one."""
        return record if self.adaptive is None else adaptive_cut(record, self.adaptive)

    def pending_rows(self, name: str) -> int:
        ds = self._open.get(name)
        return len(ds.pending) if ds is not None else 0

    def pending_datasets(self) -> dict[str, DatasetInfo]:
        """Open datasets holding rows not yet published, with what they will record: a
        dataset's directory appears only with its first shard, yet its rows are answers."""
        with self._lock:
            open_now = list(self._open.items())
        return {n: ds.writer.info for n, ds in open_now if ds.pending}

    def flush(self, name: str | None = None) -> None:
        """Publish the pending rows of dataset ``name`` (default: of every open dataset)."""
        with self._lock:
            targets = [(n, d) for n, d in self._open.items() if name in (None, n)]
        for n, ds in targets:
            with ds.lock:
                self._publish(n, ds)

    def flush_due(self) -> None:
        """Publish every dataset whose oldest pending row is ``flush_seconds`` old."""
        now = self._clock()
        with self._lock:
            targets = list(self._open.items())
        for n, ds in targets:
            with ds.lock:
                if ds.oldest is not None and now - ds.oldest >= self.flush_seconds:
                    self._publish(n, ds)

    def close(self) -> None:
        self.flush()
        self.index.close()

    def _publish(self, name: str, ds: _OpenDataset) -> None:
        """Caller holds ``ds.lock``. Pending rows stay answerable until the index has them."""
        if not ds.pending:
            return
        ds.writer.flush()
        self.index.refresh_dataset(name)
        ds.pending.clear()
        ds.oldest = None
