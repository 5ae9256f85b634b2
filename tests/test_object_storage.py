"""Datasets on object storage: written, committed, read, verified and trained from over
the real S3 protocol (moto's S3 server, a separate process started here), through
pyarrow's S3 filesystem with an endpoint override and botocore's conditional PUT."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from s3_server import s3_environment
from test_shards import make_info, make_record
from typer.testing import CliRunner

from distillcache.cli import app
from distillcache.shared.manifest import (
    MANIFEST,
    DatasetError,
    Manifest,
    read_manifest,
    update_manifest,
)
from distillcache.shared.reader import ShardDataset, verify_dataset
from distillcache.shared.storage import S3Storage, open_storage
from distillcache.shared.writer import ShardWriter

BUCKET = "distill-test"
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def endpoint():
    with s3_environment(BUCKET) as url:
        yield url


def records(seed: int, n: int, prefix: str):
    rng = np.random.default_rng(seed)
    return [make_record(rng, f"{prefix}{i}", 8, 5, 6) for i in range(n)]


def rows(ds: ShardDataset) -> list[dict]:
    return [
        {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in vars(r).items()}
        for r in ds.iter_records()
    ]


def test_write_read_verify_round_trip_matches_the_local_dataset(endpoint, tmp_path):
    uri = f"s3://{BUCKET}/round-trip/ds"
    for where in (uri, tmp_path / "local"):
        with ShardWriter(where, make_info(), writer_id="w", max_shard_rows=7) as writer:
            writer.write_many(records(0, 20, "k"))
    remote, local = ShardDataset(uri), ShardDataset(tmp_path / "local")
    # The same shards, byte for byte (a shard is uploaded only once complete).
    assert [(s.file, s.sha256, s.rows) for s in remote.shards] == [
        (s.file, s.sha256, s.rows) for s in local.shards
    ]
    assert len(remote.shards) == 3
    assert rows(remote) == rows(local)
    assert verify_dataset(uri) == ([], [])
    result = CliRunner().invoke(app, ["verify", uri])
    assert result.exit_code == 0, result.output
    assert "ok: 3 shards, 20 rows verified" in result.output
    result = CliRunner().invoke(app, ["inspect", uri])
    assert result.exit_code == 0, result.output
    assert "rows" in result.output and "20" in result.output


def test_a_shard_altered_on_the_store_is_a_fault_naming_it(endpoint):
    uri = f"s3://{BUCKET}/altered/ds"
    with ShardWriter(uri, make_info(), writer_id="w") as writer:
        writer.write_many(records(1, 4, "a"))
    storage = open_storage(uri)
    name = read_manifest(uri).shards[0].file
    data = bytearray(storage.read_bytes(name))
    data[len(data) // 2] ^= 1
    with storage.fs.open_output_stream(f"{BUCKET}/altered/ds/{name}") as f:
        f.write(bytes(data))
    faults, _ = verify_dataset(uri)
    assert len(faults) == 1 and f"{uri}/{name}" in faults[0]


def test_a_commit_that_loses_the_race_is_redone_on_the_winners_manifest(endpoint):
    """Writer A reads the manifest; writer B commits; A's conditional PUT must fail (412)
    and A must redo its change on B's manifest: both shards listed."""
    uri = f"s3://{BUCKET}/race/ds"
    info = make_info()
    update_manifest(uri, info, lambda m: None)  # the dataset exists: A's PUT is If-Match
    seen: list[list[str]] = []

    def add_a(manifest: Manifest) -> None:
        seen.append([s.file for s in manifest.shards])
        if len(seen) == 1:
            with ShardWriter(uri, info, writer_id="b") as b:
                b.write_many(records(2, 3, "b"))
        manifest.shards.append(entry_for("part-a-00000.parquet"))

    update_manifest(uri, info, add_a)
    assert seen == [[], ["part-b-00000.parquet"]]
    assert [s.file for s in read_manifest(uri).shards] == [
        "part-b-00000.parquet",
        "part-a-00000.parquet",
    ]


def test_the_first_commit_is_conditional_too(endpoint):
    """Two writers that both found no manifest: the second's If-None-Match fails."""
    uri = f"s3://{BUCKET}/first/ds"
    info = make_info()
    calls = []

    def add_a(manifest: Manifest) -> None:
        calls.append(len(manifest.shards))
        if len(calls) == 1:
            update_manifest(uri, info, lambda m: m.shards.append(entry_for("part-b.parquet")))
        manifest.shards.append(entry_for("part-a.parquet"))

    update_manifest(uri, info, add_a)
    assert calls == [0, 1]
    assert [s.file for s in read_manifest(uri).shards] == ["part-b.parquet", "part-a.parquet"]


def entry_for(file: str):
    from distillcache.shared.manifest import ShardEntry

    return ShardEntry(file=file, rows=0, tokens=0, bytes=0, sha256="", writer_id="x", created=0)


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    from test_shards import make_info, make_record
    from distillcache.shared.writer import ShardWriter

    uri, writer_id, seed, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = np.random.default_rng(seed)
    writer = ShardWriter(uri, make_info(), writer_id=writer_id, max_shard_rows=1)
    {body}
    """
)


def run_writer(uri: str, writer_id: str, seed: int, n: int, body: str) -> subprocess.Popen:
    code = WRITER.format(tests=str(TESTS), body=textwrap.indent(textwrap.dedent(body), ""))
    return subprocess.Popen(
        [sys.executable, "-c", code, uri, writer_id, str(seed), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_writer_processes_committing_at_once_keep_both_sets_of_shards(endpoint):
    uri = f"s3://{BUCKET}/two-writers/ds"
    # One row per shard: every row is its own commit, 2 x 12 commits racing. Both start
    # committing at once (each says it is ready, then waits for the word): without the
    # conditional write, this loses a shard in most runs.
    body = """
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(n):
        writer.write(make_record(rng, f"{writer_id}-{i}", 8, 5, 6))
    writer.close()
    """
    procs = [run_writer(uri, w, s, 12, body) for w, s in (("alpha", 1), ("beta", 2))]
    for proc in procs:
        assert proc.stdout.readline() == "ready\n", proc.communicate()[1]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    manifest = read_manifest(uri)
    files = sorted(s.file for s in manifest.shards)
    assert files == sorted(
        f"part-{w}-{i:05d}.parquet" for w in ("alpha", "beta") for i in range(12)
    )
    keys = sorted(r["key"] for r in rows(ShardDataset(uri)))
    assert keys == sorted(f"{w}-{i}" for w in ("alpha", "beta") for i in range(12))
    assert verify_dataset(uri) == ([], [])


@pytest.mark.parametrize("moment", ["mid-upload", "after-upload"])
def test_a_writer_killed_before_its_commit_leaves_nothing_visible(endpoint, moment):
    """Killed while a shard uploads, or after the upload but before the manifest names it:
    readers see only the committed shard, and the next writer commits over it cleanly."""
    uri = f"s3://{BUCKET}/killed-{moment}/ds"
    die = {
        # The upload is begun, half the file sent, never completed.
        "mid-upload": """
        from distillcache.shared import storage

        def place(self, tmp, name):
            f = self.fs.open_output_stream(self._path(f".{name}.tmp"))
            f.write(tmp.read_bytes()[:1000])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        storage.S3Storage.place = place
        """,
        # The shard is stored under its final name; the manifest never lists it.
        "after-upload": """
        from distillcache.shared import writer as writer_module

        writer_module.update_manifest = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        """,
    }[moment]
    body = (
        """
    import os, signal
    writer.write(make_record(rng, "kept", 8, 5, 6))
    """
        + textwrap.dedent(die).replace("\n", "\n    ")
        + """
    writer.write(make_record(rng, "lost", 8, 5, 6))
    writer.close()
    """
    )
    proc = run_writer(uri, "doomed", 3, 2, body)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, err
    ds = ShardDataset(uri)
    assert [r["key"] for r in rows(ds)] == ["kept"]
    storage = open_storage(uri)
    stored = [n for n in storage.names() if n.endswith(".parquet")]
    if moment == "mid-upload":
        assert stored == ["part-doomed-00000.parquet"]
    else:
        assert stored == ["part-doomed-00000.parquet", "part-doomed-00001.parquet"]
        assert verify_dataset(uri)[1] == [
            f"{uri}/part-doomed-00001.parquet: not listed in the manifest (an unpublished"
            " write; never read)"
        ]
    # The next writer (the same id, as a restarted worker has) takes a fresh name.
    with ShardWriter(uri, make_info(), writer_id="doomed") as writer:
        writer.write_many(records(4, 2, "next"))
    keys = [r["key"] for r in rows(ShardDataset(uri))]
    assert keys == ["kept", "next0", "next1"]
    assert verify_dataset(uri)[0] == []


def test_a_failed_upload_leaves_no_final_name_and_the_next_flush_stores_every_row(
    endpoint, monkeypatch
):
    """The local file breaks halfway through the upload (the stream is closed, which
    completes what was sent): nothing appears under a final name, the rows stay pending,
    and the next flush stores each of them once under the same fresh name."""
    import shutil

    from distillcache.shared import storage as storage_module

    uri = f"s3://{BUCKET}/failed-upload/ds"
    real = shutil.copyfileobj

    def half_then_fail(src, dst, length=0):
        dst.write(src.read(1000))
        raise OSError(5, "Input/output error")

    writer = ShardWriter(uri, make_info(), writer_id="w")
    writer.write_many(records(7, 4, "f"))
    monkeypatch.setattr(storage_module.shutil, "copyfileobj", half_then_fail)
    with pytest.raises(OSError, match="Input/output"):
        writer.flush()
    storage = open_storage(uri)
    assert storage.names() == [".part-w-00000.parquet.tmp"]  # hidden, never read
    assert writer.pending_rows == 4
    monkeypatch.setattr(storage_module.shutil, "copyfileobj", real)
    writer.close()
    assert [s.file for s in read_manifest(uri).shards] == ["part-w-00000.parquet"]
    assert sorted(r["key"] for r in rows(ShardDataset(uri))) == ["f0", "f1", "f2", "f3"]
    assert verify_dataset(uri)[0] == []


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("s3://", "not a dataset URI"),
        ("s3://Bad_Bucket/ds", "not a dataset URI"),
        ("gs://some-bucket/ds", "gs:// is not supported"),
        ("s3://no-such-bucket/ds", "bucket no-such-bucket does not exist"),
        (f"s3://{BUCKET}/nothing-here", "no manifest"),
    ],
)
def test_unusable_locations_are_one_line_errors_naming_the_uri(endpoint, uri, says):
    result = CliRunner().invoke(app, ["verify", uri])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and uri in lines[0] and says in lines[0], result.output
    if says != "no manifest":  # a writer makes a new dataset there
        with pytest.raises(DatasetError, match=says):
            ShardWriter(uri, make_info())


def test_no_credentials_is_a_one_line_error_naming_the_uri(endpoint, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # No shared credentials file either.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    uri = f"s3://{BUCKET}/round-trip/ds"
    with pytest.raises(DatasetError) as e:
        ShardDataset(uri)
    assert str(e.value).startswith(f"{uri}: no AWS credentials found")
    assert "\n" not in str(e.value)


def test_the_manifest_is_the_same_file_as_a_local_datasets(endpoint, tmp_path):
    """A remote dataset is a local one on another filesystem: copied down, it reads."""
    uri = f"s3://{BUCKET}/copy/ds"
    with ShardWriter(uri, make_info(), writer_id="w", max_shard_rows=3) as writer:
        writer.write_many(records(5, 7, "c"))
    storage = open_storage(uri)
    assert isinstance(storage, S3Storage) and MANIFEST in storage.names()
    (tmp_path / "ds").mkdir()
    pafs.copy_files(f"{BUCKET}/copy/ds", str(tmp_path / "ds"), source_filesystem=storage.fs)
    assert rows(ShardDataset(tmp_path / "ds")) == rows(ShardDataset(uri))


@pytest.mark.usefixtures("one_torch_thread")
def test_training_from_s3_equals_training_from_the_local_copy_and_resumes_exactly(
    endpoint, tmp_path
):
    from trainer_support import (
        max_weight_difference,
        task_tokenizer,
        tiny_model,
        write_teacher_shards,
    )

    from distillcache.shared.tiny_models import synthetic_task_rows
    from distillcache.trainer.config import TrainConfig
    from distillcache.trainer.loop import train

    tokenizer = task_tokenizer(tmp_path / "tokenizer")
    teacher = tiny_model(tmp_path / "teacher", tokenizer, hidden=64, seed=3)
    local = write_teacher_shards(
        teacher,
        list(synthetic_task_rows(40, seed=1)),
        tmp_path / "data" / "shards",
        k=8,
        row_group_tokens=200,
    )
    student = tiny_model(tmp_path / "student", tokenizer, hidden=64, seed=5)
    uri = f"s3://{BUCKET}/train/shards"
    pafs.copy_files(
        str(local), f"{BUCKET}/train/shards", destination_filesystem=open_storage(uri).fs
    )

    def config(data: str, out: str, **overrides) -> TrainConfig:
        settings = dict(
            data=data,
            student=str(student),
            output_dir=str(tmp_path / out),
            batch_size=4,
            max_steps=6,
            lr=3e-3,
            warmup_steps=1,
            shuffle_window=8,
            eval_fraction=0.2,
            chunk_size=16,
            max_length=64,
            log_every=1,
            progress=False,
            tensorboard=False,
        )
        return TrainConfig(**(settings | overrides))

    from_local = train(config(str(local), "local"))
    from_s3 = train(config(uri, "s3"))
    assert max_weight_difference(from_local, from_s3) == 0.0
    train(config(uri, "resumed", stop_at_step=3))
    resumed = train(config(uri, "resumed", resume="auto"))
    assert max_weight_difference(from_local, resumed) <= 1e-6


def test_export_from_and_to_s3(endpoint, tmp_path):
    uri = f"s3://{BUCKET}/export/ds"
    with ShardWriter(uri, make_info(codec="cbrt-u8"), writer_id="w") as writer:
        writer.write_many(records(6, 5, "e"))
    out = f"s3://{BUCKET}/export/float32"
    result = CliRunner().invoke(app, ["export", uri, out, "--codec", "float32"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["export", uri, str(tmp_path / "local")])
    assert result.exit_code == 0, result.output
    assert rows(ShardDataset(out)) == rows(ShardDataset(tmp_path / "local"))
    assert ShardDataset(out).info.precision == "cbrt-u8"
    again = CliRunner().invoke(app, ["export", uri, out])
    assert again.exit_code == 1 and f"{out}: already a dataset" in again.output


def test_the_teacher_store_answers_from_a_remote_read_only_source(endpoint, tmp_path):
    from test_service_index import ANY_CODEC, IDENTITY, K, assert_same, record, write_dataset

    from distillcache.services.teacher.store import TeacherStore

    uri = f"s3://{BUCKET}/source/ds"
    write_dataset(uri, [record(i) for i in range(6)], per_shard=3)
    before = open_storage(uri).read_bytes(MANIFEST)

    def store() -> TeacherStore:
        return TeacherStore(
            tmp_path / "data",
            IDENTITY,
            codec="float32",
            flush_rows=100,
            flush_seconds=10.0,
            row_group_tokens=1024,
            sources=[uri],
        )

    teacher = store()
    found = teacher.lookup([record(i).key for i in (0, 5, 7)])
    assert sorted(found) == sorted(record(i).key for i in (0, 5))
    assert found[record(5).key].dataset == uri
    assert_same(found[record(5).key].record, record(5))
    # New rows go to the data root, never to the source.
    teacher.open_dataset("local", K, None)
    teacher.put("local", [record(7)])
    teacher.close()
    assert open_storage(uri).read_bytes(MANIFEST) == before
    assert (tmp_path / "data" / "local" / MANIFEST).is_file()

    # A damaged shard of a source is not served and not quarantined (read-only).
    name = read_manifest(uri).shards[1].file
    storage = open_storage(uri)
    data = bytearray(storage.read_bytes(name))
    data[len(data) // 3] ^= 0xFF
    with storage.fs.open_output_stream(f"{BUCKET}/source/ds/{name}") as f:
        f.write(bytes(data))
    teacher = store()
    found = teacher.index.fetch([record(i).key for i in range(6)], ANY_CODEC)
    assert sorted(found) == sorted(record(i).key for i in range(3))
    assert open_storage(uri).read_bytes(MANIFEST) == before
    teacher.close()


def test_a_cache_source_that_does_not_open_stops_the_store_naming_it(endpoint, tmp_path):
    from test_service_index import IDENTITY

    from distillcache.services.teacher.store import TeacherStore

    uri = f"s3://{BUCKET}/no-dataset-here"
    with pytest.raises(DatasetError, match=f"{uri}/.manifest.json: no manifest"):
        TeacherStore(
            tmp_path,
            IDENTITY,
            codec="float32",
            flush_rows=1,
            flush_seconds=1.0,
            row_group_tokens=1024,
            sources=[uri],
        )


def test_an_endpoint_without_a_scheme_is_a_one_line_error_naming_it(endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.removeprefix("http://"))
    uri = f"s3://{BUCKET}/round-trip/ds"
    result = CliRunner().invoke(app, ["verify", uri])
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert f"{uri}: AWS_ENDPOINT_URL={endpoint.removeprefix('http://')} is not a URL" in line


def test_an_unreachable_endpoint_is_a_one_line_error_naming_the_uri(endpoint, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    uri = f"s3://{BUCKET}/round-trip/ds"
    result = CliRunner().invoke(app, ["verify", uri])
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"fault: {uri}: cannot reach S3 (")
