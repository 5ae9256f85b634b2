"""Datasets written by older layouts of the shard contract still read, value for value.

``tests/fixtures/v1-dataset`` was written by the schema-version-1 code (commit 94cb541,
k=4, cbrt-u8 codec, two shards); ``v1-dataset-rows.json`` holds the rows that code's reader
returned for it. Every later reader must return exactly those rows.
``tests/fixtures/v2-dataset`` (k=6, cbrt-u8, two shards) and ``v2-adaptive-dataset`` (the
same with an adaptive-k rule) were written by the schema-version-2 code (commit 91bddff,
before sampled datasets made version 3), with the rows its reader returned beside them.
A top-k dataset's layout did not change in version 3, so these also take appends.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from distillcache.shared.export import export_dataset
from distillcache.shared.manifest import LEGACY_MANIFEST, MANIFEST, DatasetError
from distillcache.shared.reader import ShardDataset, verify_dataset
from distillcache.shared.schema import layout_version
from distillcache.shared.writer import ShardWriter

FIXTURES = Path(__file__).parent / "fixtures"


def _plain(row) -> dict:
    """A record as the JSON the fixture holds (the v1 reader returned plain dicts)."""
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in vars(row).items()}


def test_v1_dataset_reads_exactly_as_written(tmp_path):
    root = tmp_path / "v1"
    shutil.copytree(FIXTURES / "v1-dataset", root)
    want = json.loads((FIXTURES / "v1-dataset-rows.json").read_text())
    got = [_plain(row) for row in ShardDataset(root).iter_records(verify=True)]
    assert got == want
    assert verify_dataset(root) == ([], [])


@pytest.mark.parametrize("name", ["v2-dataset", "v2-adaptive-dataset"])
def test_v2_datasets_read_exactly_as_written_and_take_appends(tmp_path, name):
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    want = json.loads((FIXTURES / f"{name}-rows.json").read_text())
    dataset = ShardDataset(root)
    assert dataset.manifest.schema_version == dataset.info.schema_version == 2
    assert [_plain(row) for row in dataset.iter_records(verify=True)] == want
    assert verify_dataset(root) == ([], [])
    # Today's writer appends to it, under the same version-2 info, and every row reads.
    rows = list(dataset.iter_records())
    extra = dataclasses.replace(rows[0], key="appended")
    with ShardWriter(root, dataset.info, writer_id="today", cut=False) as writer:
        writer.write(extra)
    again = ShardDataset(root)
    assert again.manifest.schema_version == 2 and len(again.shards) == len(dataset.shards) + 1
    got = {row.key: _plain(row) for row in again.iter_records(verify=True)}
    assert {k: v for k, v in got.items() if k != "appended"} == {r["key"]: r for r in want}
    assert got["appended"] == {**_plain(rows[0]), "key": "appended"}


def test_a_v1_dataset_is_not_appended_to_and_exports_into_the_current_layout(tmp_path):
    import pandas as pd

    root = tmp_path / "v1"
    shutil.copytree(FIXTURES / "v1-dataset", root)
    info = ShardDataset(root).info
    with pytest.raises(DatasetError, match="schema_version.*distill export"):
        ShardWriter(root, info.model_copy(update={"schema_version": layout_version(False)}))

    out = tmp_path / "v2"
    manifest = export_dataset(root, out, "cbrt-u8")
    assert manifest.schema_version == layout_version(False) == 2
    assert manifest.info.precision is None
    assert (out / MANIFEST).is_file() and not (out / LEGACY_MANIFEST).exists()
    want = json.loads((FIXTURES / "v1-dataset-rows.json").read_text())
    assert [_plain(row) for row in ShardDataset(out).iter_records(verify=True)] == want
    assert sorted(pd.read_parquet(out).key) == sorted(row["key"] for row in want)
