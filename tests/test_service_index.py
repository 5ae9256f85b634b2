"""The cache index and the store: real shards, real SQLite, rebuilt from the manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distillcache.services.teacher.identity import TeacherIdentity
from distillcache.services.teacher.index import CacheIndex
from distillcache.services.teacher.store import TeacherStore, check_dataset_name
from distillcache.shared.manifest import MANIFEST
from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import CODEC_EXACTNESS, Sampling
from distillcache.shared.writer import ShardWriter

K = 4
ANY_CODEC = tuple(CODEC_EXACTNESS)
IDENTITY = TeacherIdentity(
    model_id="tiny/teacher",
    revision="r1",
    tokenizer="tiny/teacher",
    tokenizer_hash="0" * 64,
    vocab_size=100,
    logit_width=128,
    backend="transformers",
    backend_version="test",
    dtype="float32",
)


def record(i: int, n: int = 3) -> SequenceRecord:
    rng = np.random.default_rng(i)
    logits = rng.normal(size=(n, 100))
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ids = np.argsort(-logprobs, axis=1)[:, :K]
    return SequenceRecord(
        key=f"{i:064x}",
        prompt_ids=[1, 2, i % 50],
        completion_ids=ids[:, 0],
        topk_ids=ids,
        topk_logprobs=np.take_along_axis(logprobs, ids, axis=1),
        token_logprob=np.take_along_axis(logprobs, ids[:, :1], axis=1)[:, 0],
        completion_text=f"text {i}",
        finish_reason="length",
        request={"mode": "generate", "k": K},
        meta={"id": i},
    )


def write_dataset(root: Path, records: list[SequenceRecord], per_shard: int) -> None:
    info = IDENTITY.dataset_info(K, "float32", Sampling())
    with ShardWriter(root, info, max_shard_rows=per_shard, row_group_tokens=4) as writer:
        writer.write_many(records)


def assert_same(a: SequenceRecord, b: SequenceRecord) -> None:
    assert a.key == b.key and a.meta == b.meta and a.completion_text == b.completion_text
    np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
    np.testing.assert_array_equal(a.completion_ids, b.completion_ids)
    order_a, order_b = np.argsort(a.topk_ids, axis=1), np.argsort(b.topk_ids, axis=1)
    np.testing.assert_array_equal(
        np.take_along_axis(a.topk_ids, order_a, 1), np.take_along_axis(b.topk_ids, order_b, 1)
    )
    np.testing.assert_allclose(
        np.take_along_axis(a.topk_logprobs, order_a, 1),
        np.take_along_axis(b.topk_logprobs, order_b, 1),
        rtol=1e-6,
    )
    np.testing.assert_allclose(a.token_logprob, b.token_logprob, rtol=1e-6)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    records = [record(i) for i in range(10)]
    write_dataset(tmp_path / "ds", records, per_shard=4)
    return tmp_path


def test_a_lookup_returns_the_stored_row_decoded(data_root):
    index = CacheIndex(data_root, data_root / ".distill" / "index.sqlite")
    index.refresh()
    found = index.fetch([record(i).key for i in (0, 5, 9)] + ["f" * 64], ANY_CODEC)
    assert sorted(found) == sorted(record(i).key for i in (0, 5, 9))
    for i in (0, 5, 9):
        dataset, stored = found[record(i).key]
        assert dataset == "ds"
        assert_same(stored, record(i))


def test_a_deleted_or_corrupt_index_is_rebuilt_from_the_manifests(data_root):
    db = data_root / ".distill" / "index.sqlite"
    index = CacheIndex(data_root, db)
    index.refresh()
    index.close()
    for damage in ("delete", "corrupt"):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        if damage == "corrupt":
            db.write_bytes(b"this is not a database" * 100)
        index = CacheIndex(data_root, db)
        index.refresh()
        assert len(index.fetch([record(i).key for i in range(10)], ANY_CODEC)) == 10
        index.close()


def test_shards_published_by_another_writer_are_indexed_on_refresh(data_root):
    index = CacheIndex(data_root, data_root / ".distill" / "index.sqlite")
    index.refresh()
    write_dataset(data_root / "ds", [record(i) for i in range(10, 13)], per_shard=10)
    assert index.fetch([record(11).key], ANY_CODEC) == {}
    index.refresh()
    assert_same(index.fetch([record(11).key], ANY_CODEC)[record(11).key][1], record(11))


def test_a_shard_dropped_from_the_manifest_is_forgotten(data_root):
    index = CacheIndex(data_root, data_root / ".distill" / "index.sqlite")
    index.refresh()
    manifest_path = data_root / "ds" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    dropped = manifest["shards"].pop(0)
    manifest_path.write_text(json.dumps(manifest))
    index.refresh()
    kept = index.fetch([record(i).key for i in range(10)], ANY_CODEC)
    assert len(kept) == 10 - dropped["rows"]
    assert index.contains("ds", [record(9).key]) == {record(9).key}


def test_pending_rows_are_answered_from_memory_until_published(tmp_path):
    now = [0.0]
    store = TeacherStore(
        tmp_path,
        IDENTITY,
        codec="cbrt-u8",
        flush_rows=3,
        flush_seconds=10.0,
        row_group_tokens=1024,
        clock=lambda: now[0],
    )
    store.open_dataset("live", K, None)
    assert store.pending_datasets() == {}
    store.put("live", [record(0), record(1)])
    assert store.index.fetch([record(0).key], ANY_CODEC) == {}
    # Not on disk yet, but listed: its rows already answer lookups.
    assert not (tmp_path / "live").exists()
    assert store.pending_datasets() == {"live": store.identity.dataset_info(K, "cbrt-u8", None)}
    found = store.lookup([record(0).key, record(1).key])
    assert found[record(0).key].cached and found[record(0).key].dataset == "live"
    assert_same(found[record(0).key].record, record(0))
    assert store.contains("live", [record(1).key, record(7).key]) == {record(1).key}

    store.put("live", [record(2), record(2)])  # the third row reaches flush_rows
    assert store.pending_rows("live") == 0
    assert len(store.index.fetch([record(i).key for i in range(3)], ANY_CODEC)) == 3

    store.put("live", [record(3)])
    now[0] += 9.9
    store.flush_due()
    assert store.pending_rows("live") == 1
    now[0] += 0.1  # the oldest pending row is now flush_seconds old
    store.flush_due()
    assert store.pending_rows("live") == 0
    store.put("live", [record(3)])  # already stored: not written twice
    store.close()
    rows = TeacherStore(
        tmp_path, IDENTITY, codec="cbrt-u8", flush_rows=3, flush_seconds=1, row_group_tokens=1024
    )
    assert len(rows.lookup([record(i).key for i in range(5)])) == 4


def test_live_datasets_are_named_per_teacher_and_k():
    name = IDENTITY.live_dataset(20)
    assert name.startswith("live-teacher-") and name.endswith("-k20")
    assert check_dataset_name(name) == name
    other = TeacherIdentity(**{**IDENTITY.__dict__, "revision": "r2"})
    assert other.live_dataset(20) != name


@pytest.mark.parametrize("name", ["..", "../x", "a/b", ".hidden", "", "x" * 200])
def test_dataset_names_are_one_plain_path_component(name):
    with pytest.raises(ValueError, match="dataset name"):
        check_dataset_name(name)
