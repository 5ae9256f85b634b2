"""The cache index: which dataset, shard and row hold the answer for a cache key.

The datasets' manifests are the truth and this SQLite file (WAL mode, so lookups never
wait on a writer and several processes may share it) is only a cache of them: per
dataset it remembers the manifest it last indexed (inode, mtime, size), and
``refresh`` re-reads a manifest whose stamp changed, indexes the shards it newly lists
(reading just their ``key`` column) and forgets the shards it no longer lists. A missing,
corrupt or older-version index file is rebuilt from the manifests, so deleting it is
always safe.

A shard that turns out unreadable when a hit reads it (a failed page checksum, a wrong
size) is quarantined (``shared.manifest.quarantine_shard``): dropped from its manifest
and moved aside, so its rows count as missing and are recomputed, never served. Read-only
sources (datasets outside the data root, ``s3://`` URIs among them, indexed under their
URI) are never changed: a damaged shard of one is only dropped from the index.

A hit reads one row group of one shard and decodes one row through
``shared.reader.table_records``. The last few row groups read are kept as Arrow tables,
because lookups come in runs (a batch job's rows, a re-run of the same job) that land
in the same row group.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from distillcache.shared.manifest import (
    LEGACY_MANIFEST,
    MANIFEST,
    DatasetError,
    find_manifest,
    is_dataset,
    quarantine_shard,
    read_manifest,
)
from distillcache.shared.reader import RowGroupRef, ShardDataset, table_records
from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import KEY, AdaptiveK, DatasetInfo, adaptive_answers
from distillcache.shared.storage import Storage, open_storage

log = logging.getLogger(__name__)

# 2: datasets carry their log-prob codec, so lookups can refuse less exact rows.
# 3: and their adaptive-k rule, so lookups can refuse rows cut more than asked.
INDEX_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY, stamp TEXT NOT NULL, codec TEXT NOT NULL, adaptive TEXT
);
CREATE TABLE IF NOT EXISTS shards (
    dataset TEXT NOT NULL, file TEXT NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (dataset, file)
);
CREATE TABLE IF NOT EXISTS rows (
    dataset TEXT NOT NULL, key TEXT NOT NULL, file TEXT NOT NULL,
    row_group INTEGER NOT NULL, row INTEGER NOT NULL,
    PRIMARY KEY (dataset, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rows_by_key ON rows (key);
"""

# SQLite caps bound parameters per statement (32,766 since 3.32); lookups go in chunks.
_PARAMS_PER_QUERY = 900


@dataclass(frozen=True)
class Location:
    dataset: str
    shard: str
    row_group: int
    row: int


def dataset_names(data_root: Path) -> list[str]:
    """Datasets of a data root: its direct subdirectories that hold a manifest."""
    if not data_root.is_dir():
        return []
    return sorted(
        p.name
        for p in data_root.iterdir()
        if not p.name.startswith(".") and p.is_dir() and find_manifest(p) is not None
    )


class CacheIndex:
    def __init__(
        self,
        data_root: Path,
        db_path: Path,
        *,
        sources: Sequence[str] = (),
        cached_row_groups: int = 4,
    ) -> None:
        self.data_root = data_root
        # Opened once (a remote one checks its credentials and bucket when opened), not at
        # every refresh.
        self.sources: dict[str, Storage] = {s: open_storage(s) for s in sources}
        # A source that does not open stops the start, naming it (not a silent miss).
        for storage in self.sources.values():
            read_manifest(storage)
        self.db_path = db_path
        self._lock = threading.RLock()
        # One refresh at a time: two would read the same shards only to insert them twice.
        self._refresh_lock = threading.Lock()
        self._readers: dict[str, ShardDataset] = {}
        self._tables: OrderedDict[tuple[str, str, int], pa.Table] = OrderedDict()
        self._cached_row_groups = cached_row_groups
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect()
        except sqlite3.DatabaseError as e:
            log.warning(
                "cache index %s unusable (%s); rebuilding it from the manifests", self.db_path, e
            )
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.db_path}{suffix}").unlink(missing_ok=True)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.db_path, timeout=30.0, check_same_thread=False, isolation_level=None
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # The version check and the schema in one write transaction: processes opening
            # a new index at once (Ray workers, replicas) would otherwise drop each other's
            # freshly made tables.
            db.execute("BEGIN IMMEDIATE")
            with db:
                if db.execute("PRAGMA user_version").fetchone()[0] != INDEX_VERSION:
                    for table in ("rows", "shards", "datasets"):
                        db.execute(f"DROP TABLE IF EXISTS {table}")
                    db.execute(f"PRAGMA user_version={INDEX_VERSION}")
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
            db.execute("SELECT count(*) FROM datasets").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._tables.clear()
            self._readers.clear()

    # -- keeping the index in step with the manifests ---------------------------------

    def refresh(self) -> None:
        """Bring every dataset of the data root up to date; forget vanished datasets."""
        names = dataset_names(self.data_root) + list(self.sources)
        with self._lock:
            known = [r[0] for r in self._db.execute("SELECT name FROM datasets")]
        for gone in set(known) - set(names):
            self._forget(gone)
        for name in names:
            self.refresh_dataset(name)

    def add_source(self, location: str) -> None:
        """Index one more dataset outside the data root (a URI), as the sources are."""
        if location not in self.sources:
            self.sources[location] = open_storage(location)
        self.refresh_dataset(location)

    def refresh_dataset(self, name: str) -> None:
        with self._refresh_lock:
            self._refresh_dataset(name)

    def _refresh_dataset(self, name: str) -> None:
        root = self._location(name)
        stamp = _manifest_stamp(root)
        with self._lock:
            row = self._db.execute("SELECT stamp FROM datasets WHERE name=?", (name,)).fetchone()
        if stamp is None:
            if row is not None:
                self._forget(name)
            return
        if row is not None and row[0] == stamp:
            return
        try:
            reader = ShardDataset(root)
        except DatasetError as e:
            log.warning("not indexing %s: %s", name, e)
            self._forget(name)
            return
        listed = {s.file: s.sha256 for s in reader.shards}
        with self._lock:
            indexed = dict(
                self._db.execute("SELECT file, sha256 FROM shards WHERE dataset=?", (name,))
            )
        if any(listed.get(f) != sha for f, sha in indexed.items()):
            # A shard was dropped or replaced: its keys may also live in another shard
            # that INSERT OR IGNORE skipped, so re-index the dataset from scratch.
            self._forget(name)
            indexed = {}
        new_rows: list[tuple[str, str, str, int, int]] = []
        new_shards: list[tuple[str, str, str]] = []
        for file, sha in listed.items():
            if file in indexed:
                continue
            try:
                new_rows += _shard_keys(name, reader, file)
            except (OSError, DatasetError, pa.ArrowException) as e:
                log.warning("not indexing shard %s: %s", reader.where(file), e)
                continue
            new_shards.append((name, file, sha))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR IGNORE INTO rows VALUES (?,?,?,?,?)", new_rows)
                self._db.executemany("INSERT OR REPLACE INTO shards VALUES (?,?,?)", new_shards)
                self._db.execute(
                    "INSERT OR REPLACE INTO datasets VALUES (?,?,?,?)",
                    (name, stamp, reader.info.exact_as, _rule_json(reader.info.adaptive)),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._drop_cached(name)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for table, column in (
                    ("rows", "dataset"),
                    ("shards", "dataset"),
                    ("datasets", "name"),
                ):
                    self._db.execute(f"DELETE FROM {table} WHERE {column}=?", (name,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._drop_cached(name)

    def _forget_shard(self, name: str, file: str) -> None:
        """Its rows are no longer stored: lookups miss them and writers may store them again."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for table in ("rows", "shards"):
                    self._db.execute(
                        f"DELETE FROM {table} WHERE dataset=? AND file=?", (name, file)
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _drop_cached(self, name: str) -> None:
        self._readers.pop(name, None)
        for ref in [ref for ref in self._tables if ref[0] == name]:
            del self._tables[ref]

    # -- lookups ------------------------------------------------------------------------

    def contains(self, dataset: str, keys: Iterable[str]) -> set[str]:
        """The keys among ``keys`` that ``dataset``'s published shards hold."""
        found: set[str] = set()
        keys = list(keys)
        with self._lock:
            for chunk in _chunks(keys):
                marks = ",".join("?" * len(chunk))
                found.update(
                    r[0]
                    for r in self._db.execute(
                        f"SELECT key FROM rows WHERE dataset=? AND key IN ({marks})",
                        (dataset, *chunk),
                    )
                )
        return found

    def locate(
        self, keys: Iterable[str], codecs: Sequence[str], adaptive: AdaptiveK | None = None
    ) -> dict[str, Location]:
        """Where each key is stored, in a dataset of one of ``codecs`` whose rows answer
        adaptive-k rule ``adaptive`` (``schema.adaptive_answers``; None: the full top-k),
        the first found when several hold it."""
        found: dict[str, Location] = {}
        keys = list(keys)
        codec_marks = ",".join("?" * len(codecs))
        with self._lock:
            usable = {
                name
                for name, rule in self._db.execute(
                    f"SELECT name, adaptive FROM datasets WHERE codec IN ({codec_marks})",
                    tuple(codecs),
                )
                if adaptive_answers(_rule(rule), adaptive)
            }
            for chunk in _chunks(keys):
                marks = ",".join("?" * len(chunk))
                for key, dataset, file, group, row in self._db.execute(
                    f"SELECT key, dataset, file, row_group, row FROM rows"
                    f" WHERE key IN ({marks}) ORDER BY dataset",
                    tuple(chunk),
                ):
                    if dataset in usable:
                        found.setdefault(key, Location(dataset, file, group, row))
        return found

    def fetch(
        self, keys: Iterable[str], codecs: Sequence[str], adaptive: AdaptiveK | None = None
    ) -> dict[str, tuple[str, SequenceRecord]]:
        """(dataset, stored row) for those of ``keys`` that a dataset of one of ``codecs``
        whose rows answer rule ``adaptive`` holds (``locate``).

        A location that no longer matches its shard (the dataset changed under the index)
        is left out, and that dataset is re-indexed at the next refresh.
        """
        out: dict[str, tuple[str, SequenceRecord]] = {}
        with self._lock:
            for key, loc in self.locate(keys, codecs, adaptive).items():
                try:
                    info, table = self._row_group(loc)
                    if table.column(KEY)[loc.row].as_py() != key:
                        raise DatasetError(f"{loc.shard} row {loc.row} is not {key[:16]}")
                    [record] = table_records(table.slice(loc.row, 1), info)
                except (DatasetError, IndexError, OSError, ValueError, pa.ArrowException) as e:
                    if self._damaged(loc):
                        if loc.dataset in self.sources:
                            log.error("%s/%s: damaged (%s); not served", loc.dataset, loc.shard, e)
                        else:
                            quarantine_shard(self.data_root / loc.dataset, loc.shard, str(e))
                        self._forget_shard(loc.dataset, loc.shard)
                    else:
                        log.warning("cache index is stale for %s (%s); re-indexing", loc.dataset, e)
                        self._db.execute("DELETE FROM datasets WHERE name=?", (loc.dataset,))
                    self._drop_cached(loc.dataset)
                    continue
                out[key] = (loc.dataset, record)
        return out

    def _damaged(self, loc: Location) -> bool:
        """Whether ``loc``'s shard itself is bad (still listed, yet unreadable: a failed page
        checksum, a wrong size, undecodable data) rather than the index being stale."""
        root = self._location(loc.dataset)
        try:
            reader = ShardDataset(root)
            if loc.shard not in {s.file for s in reader.shards}:
                return False
            reader.read_row_group(RowGroupRef(loc.shard, loc.row_group, 0))
        except FileNotFoundError:
            return False
        except (DatasetError, OSError, ValueError, pa.ArrowException):
            return is_dataset(root)
        return False

    def _row_group(self, loc: Location) -> tuple[DatasetInfo, pa.Table]:
        reader = self._reader(loc.dataset)
        ref = (loc.dataset, loc.shard, loc.row_group)
        table = self._tables.get(ref)
        if table is None:
            group = RowGroupRef(loc.shard, loc.row_group, 0)
            try:
                table = reader.read_row_group(group)
            except DatasetError:
                # Another process indexed a shard published after this reader's manifest.
                reader = self._reader(loc.dataset, fresh=True)
                table = reader.read_row_group(group)
            self._tables[ref] = table
            while len(self._tables) > self._cached_row_groups:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(ref)
        return reader.info, table

    def _reader(self, name: str, *, fresh: bool = False) -> ShardDataset:
        reader = None if fresh else self._readers.get(name)
        if reader is None:
            reader = self._readers[name] = ShardDataset(self._location(name))
        return reader

    def _location(self, name: str) -> Path | Storage:
        """Where dataset ``name`` lives: a source is named by its own location."""
        return self.sources.get(name) or self.data_root / name


def _manifest_stamp(root: Path | Storage) -> str | None:
    """Changes whenever the manifest is replaced (for a local one: inode, mtime, size)."""
    storage = open_storage(root)
    for name in (MANIFEST, LEGACY_MANIFEST):
        try:
            return ":".join(map(str, storage.stamp(name)))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return None


def _shard_keys(
    dataset: str, reader: ShardDataset, file: str
) -> list[tuple[str, str, str, int, int]]:
    """The keys of one shard, read through the reader (its size, schema and checksums)."""
    pf = reader.open_shard(file)
    rows = []
    for group in range(pf.metadata.num_row_groups):
        keys = pf.read_row_group(group, columns=[KEY]).column(KEY).to_pylist()
        rows += [(dataset, key, file, group, i) for i, key in enumerate(keys)]
    return rows


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), _PARAMS_PER_QUERY):
        yield items[start : start + _PARAMS_PER_QUERY]


def _rule_json(rule: AdaptiveK | None) -> str | None:
    return None if rule is None else rule.model_dump_json()


def _rule(text: str | None) -> AdaptiveK | None:
    return None if text is None else AdaptiveK.model_validate_json(text)
