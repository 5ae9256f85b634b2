"""``.manifest.json``: the list of a dataset's complete shards, replaced atomically.

The manifest is the only source of truth for which shards exist: a shard file that is on
disk but not in the manifest (a writer died between rename and manifest update) is never
read. Several writers (teacher replicas) may share one dataset directory; they serialize
their read-modify-write of the manifest with an advisory lock on ``.manifest.lock``.

Both names start with a dot so that a dataset directory opens as it is in every Parquet
reader: Arrow's discovery (pandas) skips names starting with ``.`` or ``_``, Hugging Face
``datasets`` only those starting with ``.``. Schema-version-1 datasets named their
manifest ``manifest.json``; ``find_manifest`` finds either, and they still read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from .schema import READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION, DatasetInfo

log = logging.getLogger(__name__)

MANIFEST = ".manifest.json"
LEGACY_MANIFEST = "manifest.json"  # schema version 1
_LOCK = ".manifest.lock"


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
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    info: DatasetInfo
    shards: list[ShardEntry] = []
    updated: float = 0.0

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


class DatasetError(Exception):
    """A dataset is missing, malformed, or a shard in it is damaged; the message names it."""


def find_manifest(root: str | os.PathLike) -> Path | None:
    """The manifest file of dataset directory ``root`` (either layout), None if it has none.

    Use this to tell whether a directory is a dataset.
    """
    for name in (MANIFEST, LEGACY_MANIFEST):
        path = Path(root) / name
        if path.is_file():
            return path
    return None


def read_manifest(root: str | os.PathLike) -> Manifest:
    path = find_manifest(root)
    if path is None:
        raise DatasetError(
            f"{Path(root) / MANIFEST}: no manifest; is {root} a distillcache dataset?"
        )
    try:
        raw = path.read_text()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no manifest; is {root} a distillcache dataset?") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version not in READABLE_SCHEMA_VERSIONS:
        raise DatasetError(
            f"{path}: schema version {version!r}; this distillcache reads versions"
            f" {', '.join(map(str, READABLE_SCHEMA_VERSIONS))}"
        )
    try:
        return Manifest.model_validate(data)
    except ValueError as e:
        raise DatasetError(f"{path}: {e}") from None


def write_manifest_atomic(root: str | os.PathLike, manifest: Manifest) -> None:
    """Write to a temporary file, fsync it, rename over the manifest, fsync the directory."""
    root = Path(root)
    manifest.updated = time.time()
    tmp = root / f"{MANIFEST}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(manifest.model_dump_json(indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / MANIFEST)
    except OSError:
        # The old manifest stands; a half-written temporary must not take disk or confuse.
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def existing_manifest(root: str | os.PathLike, info: DatasetInfo) -> Manifest | None:
    """The manifest of the dataset at ``root`` if there is one (None: no dataset yet, and
    nothing is created), after checking that rows made as ``info`` say may join it."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root}: a file, not a dataset directory")
    if find_manifest(root) is None:
        return None
    manifest = read_manifest(root)
    mine, theirs = info.compatibility(), manifest.info.compatibility()
    diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
    if diff:
        detail = ", ".join(f"{k}: stored {a!r}, new {b!r}" for k, (a, b) in diff.items())
        hint = (
            f"; `distill export {root} NEW_DIR` copies it into the current layout"
            if "schema_version" in diff
            else ""
        )
        raise DatasetError(f"{root}: dataset was made differently ({detail}){hint}")
    return manifest


@contextlib.contextmanager
def locked_manifest(root: str | os.PathLike, info: DatasetInfo) -> Iterator[Manifest]:
    """Hold the dataset's lock, yield its manifest (new if none), write it back on success.

    Refuses a dataset whose existing info disagrees with ``info`` on anything a reader
    needs to mix rows (teacher, tokenizer, k, codec).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / _LOCK, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            manifest = existing_manifest(root, info) or Manifest(info=info)
            yield manifest
            write_manifest_atomic(root, manifest)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def quarantined_path(root: str | os.PathLike, file: str) -> Path:
    """Where a damaged shard is kept once dropped from the manifest: a hidden name, so no
    reader (ours or Arrow's dataset discovery) reads it and no writer reuses its name."""
    return Path(root) / f".{file}.damaged"


def quarantine_shard(root: str | os.PathLike, file: str, reason: str) -> bool:
    """Drop a damaged shard from the manifest and move it aside (kept for inspection).

    Its rows are then missing, not "present": lookups miss and the teacher recomputes
    them, into this dataset as into any other, and a resumed job writes them again.
    Returns False when the manifest no longer lists the shard (someone else did it).
    """
    root = Path(root)
    info = read_manifest(root).info
    with locked_manifest(root, info) as manifest:
        listed = [s for s in manifest.shards if s.file == file]
        if not listed:
            return False
        manifest.shards = [s for s in manifest.shards if s.file != file]
    # Renamed only once the manifest no longer lists it: a reader never meets a listed
    # shard that is missing.
    (root / file).rename(quarantined_path(root, file))
    log.error(
        "%s: damaged (%s); dropped from the manifest, kept as %s",
        root / file,
        reason,
        quarantined_path(root, file).name,
    )
    return True
