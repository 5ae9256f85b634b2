"""Copying a dataset into another log-prob codec and the current layout (`distill export`).

For people who want plain floats in every reader (``--codec float32``), and to bring a
dataset of an older schema version into the current one. Each row is read (every shard's
sha256 checked first), its log-probs decoded and re-encoded with the new codec; the ids
and ``tail_logprob`` (computed at capture from the exact values) are copied as they are.

The metadata stays true: converting to a more exact codec cannot restore what the source
codec rounded away, so ``DatasetInfo.precision`` records the least exact codec the values
went through, and a cache that serves hits "at least as exact as asked" reads it.
"""

from __future__ import annotations

from pathlib import Path

from .manifest import DatasetError, Manifest, is_dataset, read_manifest
from .reader import ShardDataset
from .schema import CODEC_EXACTNESS, LogprobCodec, layout_version
from .writer import ShardWriter


def least_exact(*codecs: LogprobCodec) -> LogprobCodec:
    return max(codecs, key=CODEC_EXACTNESS.index)


def export_dataset(src: str | Path, dst: str | Path, codec: LogprobCodec) -> Manifest:
    """Write every row of dataset ``src`` into the new dataset ``dst`` with ``codec``."""
    source = ShardDataset(src)
    if source.info.sampled is not None:
        raise DatasetError(
            f"{src}: a sampled dataset stores draw counts, not log-probs: it has nothing to"
            " re-encode (copy the directory instead)"
        )
    if is_dataset(dst):
        raise DatasetError(f"{dst}: already a dataset; export into a new directory or prefix")
    bound = least_exact(source.info.exact_as, codec)
    info = source.info.model_copy(
        update={
            "schema_version": layout_version(False),
            "logprob_codec": codec,
            "precision": None if bound == codec else bound,
        }
    )
    # An adaptive source's positions are cut already; cutting the decoded values again
    # could keep a different number of entries.
    with ShardWriter(dst, info, writer_id="export", cut=False) as writer:
        writer.write_many(source.iter_records(verify=True))
    return read_manifest(dst)
