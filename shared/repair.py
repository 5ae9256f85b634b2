"""Rebuilding a dataset's manifest from its shards, when the manifest itself is damaged.

Every shard carries its dataset's ``DatasetInfo`` in its own Parquet metadata, and its
row count in its footer, so a torn or unreadable manifest loses nothing the shards do not
still say: the rebuilt manifest lists every shard that opens and agrees with the others,
with rows, tokens, bytes and sha256 recomputed. A shard that does not open is left out
(and stays on disk for inspection); shards that disagree on the dataset's info are an
error naming them, since no single manifest can be true for both.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from .manifest import DatasetError, Manifest, ShardEntry, write_manifest_atomic
from .schema import PARQUET_METADATA_KEY, TOKEN_LOGPROB, DatasetInfo
from .writer import file_sha256

log = logging.getLogger(__name__)

_SHARD = re.compile(r"^part-(?P<writer>.+)-\d{5}\.parquet$")


def rebuild_manifest(root: str | os.PathLike) -> Manifest:
    """Write a manifest for ``root`` from its shards' own metadata; returns it."""
    root = Path(root)
    info: DatasetInfo | None = None
    first = ""
    entries: list[ShardEntry] = []
    for path in sorted(root.glob("part-*.parquet")):
        match = _SHARD.match(path.name)
        try:
            shard = pq.ParquetFile(path)
            shard_info = DatasetInfo.model_validate_json(
                shard.schema_arrow.metadata[PARQUET_METADATA_KEY]
            )
            lengths = pc.list_value_length(shard.read(columns=[TOKEN_LOGPROB]).column(0))
            tokens = int(pc.sum(lengths).as_py() or 0)
        except Exception as e:  # noqa: BLE001 - any shard that does not open is left out
            log.error("%s: left out of the rebuilt manifest: %s", path, e)
            continue
        if info is None:
            info, first = shard_info, path.name
        elif shard_info.compatibility() != info.compatibility():
            raise DatasetError(
                f"{root}: shards {first} and {path.name} were made differently; "
                "no manifest can list both"
            )
        entries.append(
            ShardEntry(
                file=path.name,
                rows=shard.metadata.num_rows,
                tokens=tokens,
                bytes=path.stat().st_size,
                sha256=file_sha256(path),
                writer_id=match["writer"] if match else "unknown",
                created=path.stat().st_mtime,
                page_checksums=shard_info.schema_version >= 2,
            )
        )
    if info is None:
        raise DatasetError(f"{root}: no readable shard to rebuild a manifest from")
    manifest = Manifest(schema_version=info.schema_version, info=info, shards=entries)
    write_manifest_atomic(root, manifest)
    log.warning("%s: manifest rebuilt from %d shards", root, len(entries))
    return manifest
