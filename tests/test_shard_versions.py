"""Datasets written by older layouts of the shard contract still read, value for value.

``tests/fixtures/v1-dataset`` was written by the schema-version-1 code (commit 94cb541,
k=4, cbrt-u8 codec, two shards); ``v1-dataset-rows.json`` holds the rows that code's reader
returned for it. Every later reader must return exactly those rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from distillcache.shared.reader import ShardDataset, verify_dataset

FIXTURES = Path(__file__).parent / "fixtures"


def _plain(row: dict) -> dict:
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in row.items()}


def test_v1_dataset_reads_exactly_as_written(tmp_path):
    root = tmp_path / "v1"
    shutil.copytree(FIXTURES / "v1-dataset", root)
    want = json.loads((FIXTURES / "v1-dataset-rows.json").read_text())
    got = [_plain(row) for row in ShardDataset(root).iter_rows(verify=True)]
    assert got == want
    assert verify_dataset(root) == ([], [])
