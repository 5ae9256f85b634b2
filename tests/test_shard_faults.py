"""The writer under faults: a full disk at any write site, and the order of its syncs.

Disk-full is injected as ``OSError(ENOSPC)`` at each site where the writer or the manifest
touches the disk, one site per test case: the row-group write, the footer, the shard's
fsync, its rename, the directory fsync, and the manifest's create, write, fsync, rename and
directory fsync. After the fault the "disk is freed" and writing goes on. Whatever the
site, every record accepted is published exactly once, with its own values, under a name
no other shard had, and the manifest's counts are true (``verify_dataset`` checks each
shard's sha256 and rows against it). Where the test may mount a tmpfs (root), a last test
fills a real 512 KiB filesystem instead of injecting the error; the writer before this
test existed failed it with "20 rows, manifest says 25".
"""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from service_support import fill_disk
from test_shards import assert_row_matches, make_info, make_record

from distillcache.shared import manifest as manifest_module
from distillcache.shared import storage as storage_module
from distillcache.shared.manifest import MANIFEST, read_manifest
from distillcache.shared.reader import ShardDataset, verify_dataset
from distillcache.shared.writer import ShardWriter


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class DiskFull:
    """Raises ENOSPC at the ``nth`` occurrence of one write site once armed, then never."""

    def __init__(self, site: str, nth: int = 1) -> None:
        self.site, self.nth = site, nth
        self.armed = False
        self.fired = 0

    def hit(self, site: str) -> None:
        if not self.armed or site != self.site:
            return
        self.nth -= 1
        if self.nth == 0:
            self.armed = False
            self.fired += 1
            raise OSError(errno.ENOSPC, f"No space left on device (injected at {site})")


def _install(monkeypatch, fault: DiskFull) -> None:
    real_write_table = pq.ParquetWriter.write_table
    real_close = pq.ParquetWriter.close
    real_fsync, real_replace, real_open = os.fsync, os.replace, builtins.open

    def write_table(self, *a, **kw):
        fault.hit("row group write")
        return real_write_table(self, *a, **kw)

    def close(self):
        if not getattr(self, "is_open", True):
            return real_close(self)
        fault.hit("shard footer")
        return real_close(self)

    def fsync(fd):
        path = _fd_path(fd)
        if os.path.isdir(path):
            fault.hit("dir fsync")
        elif path.endswith(".parquet.tmp"):
            fault.hit("shard fsync")
        elif MANIFEST in path:
            fault.hit("manifest fsync")
        return real_fsync(fd)

    def replace(src, dst):
        if str(src).endswith(".parquet.tmp"):
            fault.hit("shard rename")
        elif str(dst).endswith(MANIFEST):
            fault.hit("manifest rename")
        return real_replace(src, dst)

    class HalfWritten:
        """A file whose write stores half its data, then finds the disk full."""

        def __init__(self, f):
            self._f = f

        def write(self, data):
            try:
                fault.hit("manifest write")
            except OSError:
                self._f.write(data[: len(data) // 2])
                raise
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def manifest_open(path, mode="r", *a, **kw):
        if "w" in mode:
            fault.hit("manifest create")
            return HalfWritten(real_open(path, mode, *a, **kw))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)
    monkeypatch.setattr(pq.ParquetWriter, "close", close)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    # The manifest is written by the local storage (shared/storage.py).
    monkeypatch.setattr(storage_module, "open", manifest_open, raising=False)


SITES = [
    ("row group write", 1),
    ("shard footer", 1),
    ("shard fsync", 1),
    ("shard rename", 1),
    ("dir fsync", 1),  # the writer's, between the shard's rename and the manifest update
    ("manifest create", 1),
    ("manifest write", 1),
    ("manifest fsync", 1),
    ("manifest rename", 1),
    ("dir fsync", 2),  # the manifest's, after its rename: the manifest already lists it
]


@pytest.mark.parametrize(("site", "nth"), SITES, ids=[f"{s}#{n}" for s, n in SITES])
def test_disk_full_at_any_write_site_loses_no_row_and_reuses_no_name(
    tmp_path, monkeypatch, site, nth
):
    fault = DiskFull(site, nth)
    _install(monkeypatch, fault)
    rng = np.random.default_rng(7)
    records = [make_record(rng, f"key-{i:02d}", 8, 3, 6) for i in range(23)]
    writer = ShardWriter(tmp_path, make_info(), max_shard_rows=5, row_group_tokens=12)
    failures = 0
    for i, record in enumerate(records):
        if i == 7:
            fault.armed = True  # the disk fills up after one shard is published
        try:
            writer.write(record)
            if i == 16:
                writer.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
            failures += 1
            # While the disk is full, the manifest still names only sound shards.
            assert verify_dataset(tmp_path)[0] == []
    assert fault.fired == 1 and failures == 1, f"the fault at {site} did not reach the caller"
    writer.close()  # the disk has room again

    assert verify_dataset(tmp_path)[0] == []
    manifest = read_manifest(tmp_path)
    names = [s.file for s in manifest.shards]
    assert len(names) == len(set(names)), "a shard name was listed twice"
    assert manifest.rows == len(records)
    assert manifest.tokens == sum(r.n_scored for r in records)
    rows = sorted(ShardDataset(tmp_path).iter_records(), key=lambda row: row.key)
    assert [row.key for row in rows] == [r.key for r in records]
    for row, record in zip(rows, records, strict=True):
        assert_row_matches(row, record)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == sorted(names)
    assert not list(tmp_path.glob(".*.tmp")), "a failed write left a temporary file"


def test_shard_and_directory_are_synced_before_the_manifest_names_the_shard(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", _fd_path(fd)))
        return real_fsync(fd)

    def replace(src, dst):
        if str(dst).endswith(MANIFEST):
            for entry in manifest_module.Manifest.model_validate_json(Path(src).read_text()).shards:
                events.append(("listed", entry.file))
        real_replace(src, dst)
        events.append(("renamed", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path, make_info(), max_shard_rows=2) as writer:
        writer.write_many(make_record(rng, f"k{i}", 8, 2, 3) for i in range(5))

    names = [s.file for s in read_manifest(tmp_path).shards]
    assert len(names) == 3
    for name in names:
        final = str(tmp_path / name)
        tmp = str(tmp_path / f".{name}.tmp")
        first_listed = events.index(("listed", name))
        synced = events.index(("fsync", tmp))
        renamed = events.index(("renamed", final))
        dir_synced = [i for i, e in enumerate(events) if e == ("fsync", str(tmp_path))]
        assert synced < renamed < first_listed, events
        assert any(renamed < i < first_listed for i in dir_synced), (
            f"{name}: the directory was not fsynced between its rename and its listing"
        )


def _rows(ds: ShardDataset) -> list[dict]:
    return [
        {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in vars(row).items()}
        for row in ds.iter_records()
    ]


def test_every_flipped_bit_of_a_shard_is_refused_or_changes_nothing(tmp_path):
    """A shard altered on disk is never served as a sound one, wherever the change lands."""
    rng = np.random.default_rng(3)
    with ShardWriter(tmp_path, make_info(4, "cbrt-u8")) as writer:
        writer.write_many(make_record(rng, f"k{i}", 4, 2, 3) for i in range(3))
    shard = tmp_path / read_manifest(tmp_path).shards[0].file
    ds = ShardDataset(tmp_path)
    want, data = _rows(ds), shard.read_bytes()
    refused = 0
    for pos in range(len(data)):
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        shard.write_bytes(bytes(flipped))
        try:
            got = _rows(ds)
        except manifest_module.DatasetError as e:
            assert shard.name in str(e)
            refused += 1
            continue
        assert got == want, f"a bit flipped at byte {pos} of {len(data)} was served"
    assert refused > len(data) // 2


def test_an_altered_shard_without_page_checksums_is_refused_before_first_use(tmp_path):
    # Schema-v1 shards carry no page checksums: their sha256 is checked once on first use.
    import shutil

    root = tmp_path / "v1"
    shutil.copytree(Path(__file__).parent / "fixtures" / "v1-dataset", root)
    shard = root / read_manifest(root).shards[0].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    ds = ShardDataset(root)
    with pytest.raises(manifest_module.DatasetError, match=f"{shard.name}.*altered"):
        ds.read_row_group(ds.row_groups([shard.name])[0])


@pytest.fixture
def tiny_filesystem(tmpfs):
    """A 512 KiB tmpfs: a disk that really fills up (skipped where mounting is not allowed)."""
    return tmpfs("512k")


def test_a_really_full_disk_loses_no_row_once_space_is_freed(tiny_filesystem):
    root = tiny_filesystem / "ds"
    rng = np.random.default_rng(11)
    records = [make_record(rng, f"key-{i:02d}", 8, 3, 6) for i in range(30)]
    writer = ShardWriter(root, make_info(), max_shard_rows=5, row_group_tokens=12)
    writer.write_many(records[:5])
    assert read_manifest(root).rows == 5
    filler = fill_disk(tiny_filesystem, leave=3 * 4096)  # room for part of a shard

    failures = 0
    for record in records[5:]:
        try:
            writer.write(record)
        except OSError:
            failures += 1
            assert verify_dataset(root)[0] == []
    try:
        writer.flush()
    except OSError:
        failures += 1
    assert failures >= 1, "the disk never filled up"
    filler.unlink()
    writer.close()

    assert verify_dataset(root)[0] == []
    manifest = read_manifest(root)
    assert manifest.rows == len(records)
    rows = sorted(ShardDataset(root).iter_records(), key=lambda row: row.key)
    assert [row.key for row in rows] == [r.key for r in records]
    for row, record in zip(rows, records, strict=True):
        assert_row_matches(row, record)
    assert not list(root.glob(".*.tmp")), "a failed write left a temporary file"
