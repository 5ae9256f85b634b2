"""``.manifest.json``: the list of a dataset's complete shards, replaced atomically.

The manifest is the only source of truth for which shards exist: a shard file that is on
disk but not in the manifest (a writer died between rename and manifest update) is never
read. Several writers (teacher replicas, capture workers) may share one dataset; every
change is a read-modify-write (``update_manifest``) that never loses a concurrent
writer's change: in a local directory the writers serialize it with an advisory lock on
``.manifest.lock``; on object storage the write is conditional on the version read and
redone on a conflict (``shared/storage.py`` says how and why).

Both names start with a dot so that a dataset directory opens as it is in every Parquet
reader: Arrow's discovery (pandas) skips names starting with ``.`` or ``_``, Hugging Face
``datasets`` only those starting with ``.``. Schema-version-1 datasets named their
manifest ``manifest.json``; ``find_manifest`` finds either, and they still read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from .schema import READABLE_SCHEMA_VERSIONS, DatasetInfo
from .storage import DatasetError, LocalStorage, Storage, VersionConflict, backoff, open_storage

log = logging.getLogger(__name__)

MANIFEST = ".manifest.json"
LEGACY_MANIFEST = "manifest.json"  # schema version 1
# Conditional writes one writer may lose in a row before it gives up (each loss means
# another writer committed, so the dataset is making progress).
_MAX_CONFLICTS = 50


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    rows: int
    tokens: int
    bytes: int
    sha256: str
    writer_id: str
    created: float
    # Written with Parquet page checksums (CRC-32 of every page, checked on every read).
    page_checksums: bool = False


class Manifest(BaseModel):
    """The dataset's shards and its DatasetInfo; ``schema_version`` is the info's."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int
    info: DatasetInfo
    shards: list[ShardEntry] = []
    updated: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _info_version(cls, value: Any) -> Any:
        if isinstance(value, dict) and "schema_version" not in value:
            info = value.get("info")
            version = info.schema_version if isinstance(info, DatasetInfo) else None
            if isinstance(info, dict):
                version = DatasetInfo.model_validate(info).schema_version
            value = {**value, "schema_version": version}
        return value

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


def find_manifest(root: str | os.PathLike) -> Path | None:
    """The manifest file of dataset directory ``root`` (either layout), None if it has none.

    Use this to tell whether a directory is a dataset.
    """
    for name in (MANIFEST, LEGACY_MANIFEST):
        path = Path(root) / name
        if path.is_file():
            return path
    return None


def is_dataset(root: str | os.PathLike | Storage) -> bool:
    """Whether a manifest (either layout) is at ``root``, a directory or a URI."""
    storage = open_storage(root)
    return any(storage.exists(name) for name in (MANIFEST, LEGACY_MANIFEST))


def read_manifest(root: str | os.PathLike | Storage) -> Manifest:
    """The manifest of the dataset at ``root`` (a directory or a URI)."""
    storage = open_storage(root)
    for name in (MANIFEST, LEGACY_MANIFEST):
        raw = storage.read_bytes(name)
        if raw is not None:
            return parse_manifest(raw, storage.where(name))
    raise DatasetError(
        f"{storage.where(MANIFEST)}: no manifest; is {storage.location} a distillcache dataset?"
    )


def parse_manifest(raw: bytes, where: str) -> Manifest:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{where}: not valid JSON ({e})") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version not in READABLE_SCHEMA_VERSIONS:
        raise DatasetError(
            f"{where}: schema version {version!r}; this distillcache reads versions"
            f" {', '.join(map(str, READABLE_SCHEMA_VERSIONS))}"
        )
    try:
        return Manifest.model_validate(data)
    except ValueError as e:
        raise DatasetError(f"{where}: {e}") from None


def write_manifest_atomic(root: str | os.PathLike, manifest: Manifest) -> None:
    """Replace a local dataset's manifest, unconditionally (a repair)."""
    manifest.updated = time.time()
    LocalStorage(root).write_versioned(MANIFEST, manifest.model_dump_json(indent=1).encode(), None)


def existing_manifest(root: str | os.PathLike | Storage, info: DatasetInfo) -> Manifest | None:
    """The manifest of the dataset at ``root`` if there is one (None: no dataset yet, and
    nothing is created), after checking that rows made as ``info`` say may join it."""
    storage = open_storage(root)
    storage.check_dataset_place()
    if not is_dataset(storage):
        return None
    manifest = read_manifest(storage)
    check_compatible(manifest, info, storage.location)
    return manifest


def check_compatible(manifest: Manifest, info: DatasetInfo, location: str) -> None:
    """Refuse rows made as ``info`` in a dataset whose info disagrees on anything a reader
    needs to mix rows (teacher, tokenizer, k, codec)."""
    mine, theirs = info.compatibility(), manifest.info.compatibility()
    diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
    if diff:
        detail = ", ".join(f"{k}: stored {a!r}, new {b!r}" for k, (a, b) in diff.items())
        hint = (
            f"; `distill export {location} NEW_DIR` copies it into the current layout"
            if "schema_version" in diff
            else ""
        )
        raise DatasetError(f"{location}: dataset was made differently ({detail}){hint}")


def update_manifest(
    root: str | os.PathLike | Storage, info: DatasetInfo, change: Callable[[Manifest], None]
) -> Manifest:
    """Apply ``change`` to the dataset's manifest (a new one if none) and commit it.

    ``change`` sees the latest committed manifest and may be called more than once: on
    object storage a commit whose conditional write lost to another writer's is redone on
    the manifest that writer committed, so neither loses its shards. Refuses a dataset
    whose existing info disagrees with ``info``.
    """
    storage = open_storage(root)
    with storage.lock():
        conflicts = 0
        while True:
            raw, version = storage.read_versioned(MANIFEST)
            if raw is None:
                manifest = existing_manifest(storage, info) or Manifest(info=info)
            else:
                manifest = parse_manifest(raw, storage.where(MANIFEST))
                check_compatible(manifest, info, storage.location)
            change(manifest)
            manifest.updated = time.time()
            data = manifest.model_dump_json(indent=1).encode()
            try:
                storage.write_versioned(MANIFEST, data, version)
                return manifest
            except VersionConflict:
                conflicts += 1
                if conflicts > _MAX_CONFLICTS:
                    raise OSError(
                        f"{storage.where(MANIFEST)}: lost {conflicts} conditional writes in a"
                        " row to other writers; try again"
                    ) from None
                backoff(conflicts)


def quarantined_name(file: str) -> str:
    """Where a damaged shard is kept once dropped from the manifest: a hidden name, so no
    reader (ours or Arrow's dataset discovery) reads it and no writer reuses its name."""
    return f".{file}.damaged"


def quarantined_path(root: str | os.PathLike, file: str) -> Path:
    """``quarantined_name`` in a local dataset directory."""
    return Path(root) / quarantined_name(file)


def quarantine_shard(root: str | os.PathLike, file: str, reason: str) -> bool:
    """Drop a damaged shard from the manifest and move it aside (kept for inspection).

    Its rows are then missing, not "present": lookups miss and the teacher recomputes
    them, into this dataset as into any other, and a resumed job writes them again.
    Returns False when the manifest no longer lists the shard (someone else did it).
    """
    storage = open_storage(root)
    found = []

    def drop(manifest: Manifest) -> None:
        found[:] = [s for s in manifest.shards if s.file == file]
        manifest.shards = [s for s in manifest.shards if s.file != file]

    update_manifest(storage, read_manifest(storage).info, drop)
    if not found:
        return False
    # Moved only once the manifest no longer lists it: a reader never meets a listed
    # shard that is missing.
    storage.move(file, quarantined_name(file))
    log.error(
        "%s: damaged (%s); dropped from the manifest, kept as %s",
        storage.where(file),
        reason,
        quarantined_name(file),
    )
    return True
