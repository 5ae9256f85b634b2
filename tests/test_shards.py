"""The shard contract: what a writer stores, every reader gets back, whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from distillcache.cli import app
from distillcache.shared.codec import canonical_topk, decode_logprobs, encode_logprobs, tail_logprob
from distillcache.shared.manifest import DatasetError, read_manifest
from distillcache.shared.reader import ShardDataset, verify_dataset
from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import DatasetInfo
from distillcache.shared.writer import ShardWriter

VOCAB = 500


def make_info(k: int = 8, codec: str = "float32", **overrides) -> DatasetInfo:
    fields = dict(
        teacher_model="tiny-teacher",
        tokenizer="tiny-tok",
        tokenizer_hash="0" * 64,
        vocab_size=VOCAB,
        logit_width=512,
        k=k,
        logprob_codec=codec,
        backend="test",
        backend_version="0",
    )
    fields.update(overrides)
    return DatasetInfo(**fields)


def make_record(rng: np.random.Generator, key: str, k: int, prompt_len: int, completion_len: int):
    logits = rng.normal(scale=3.0, size=(completion_len, VOCAB))
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    top = np.argsort(-logprobs, axis=1)[:, :k]
    completion = rng.integers(0, VOCAB, completion_len)
    return SequenceRecord(
        key=key,
        prompt_ids=rng.integers(0, VOCAB, prompt_len),
        completion_ids=completion,
        completion_text=f"text {key} ✓",
        topk_ids=top,
        topk_logprobs=np.take_along_axis(logprobs, top, axis=1),
        token_logprob=logprobs[np.arange(completion_len), completion],
        finish_reason="stop",
        request={"mode": "generate", "k": k},
        meta={"question_id": key},
    )


def write_dataset(root: Path, n: int, k: int = 8, codec: str = "float32", seed: int = 0, **kw):
    rng = np.random.default_rng(seed)
    records = [
        make_record(rng, f"key-{i}", k, int(rng.integers(1, 6)), int(rng.integers(1, 9)))
        for i in range(n)
    ]
    with ShardWriter(root, make_info(k, codec), **kw) as writer:
        writer.write_many(records)
    return records


def assert_row_matches(row: SequenceRecord, rec: SequenceRecord, exact: bool = True) -> None:
    assert row.key == rec.key
    np.testing.assert_array_equal(row.prompt_ids, rec.prompt_ids)
    np.testing.assert_array_equal(row.completion_ids, rec.completion_ids)
    ids, lps = canonical_topk(rec.topk_ids, rec.topk_logprobs)
    np.testing.assert_array_equal(row.topk_ids, ids)
    if exact:
        np.testing.assert_array_equal(row.topk_logprobs, lps)
    np.testing.assert_array_equal(row.token_logprob, rec.token_logprob)
    np.testing.assert_allclose(row.tail_logprob, tail_logprob(rec.topk_logprobs))
    assert row.meta == rec.meta
    assert row.completion_text == rec.completion_text


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(1, 12),
    k=st.sampled_from([1, 3, 8]),
    seed=st.integers(0, 2**16),
    row_group_tokens=st.integers(1, 40),
    max_shard_rows=st.integers(1, 7),
)
def test_round_trip_returns_every_record_exactly(
    tmp_path_factory, n, k, seed, row_group_tokens, max_shard_rows
):
    root = tmp_path_factory.mktemp("ds")
    records = write_dataset(
        root, n, k=k, seed=seed, row_group_tokens=row_group_tokens, max_shard_rows=max_shard_rows
    )
    rows = list(ShardDataset(root).iter_records())
    assert len(rows) == n
    for row, rec in zip(rows, records, strict=True):
        assert_row_matches(row, rec)
    manifest = read_manifest(root)
    assert manifest.rows == n
    assert manifest.tokens == sum(r.n_scored for r in records)


def test_compact_codec_keeps_the_topk_distribution_within_1e4_nats(tmp_path):
    rng = np.random.default_rng(1)
    k = 64
    # Peaked, LM-like distributions: a few likely tokens and a long tail.
    logits = rng.standard_t(df=2, size=(2000, VOCAB)) * 2.5
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    top = np.argsort(-logprobs, axis=1)[:, :k]
    exact = np.take_along_axis(logprobs, top, axis=1).astype(np.float32)
    decoded = decode_logprobs(encode_logprobs(exact, "cbrt-u8"), "cbrt-u8").astype(np.float64)
    log_p = exact - np.logaddexp.reduce(exact.astype(np.float64), axis=1, keepdims=True)
    log_q = decoded - np.logaddexp.reduce(decoded, axis=1, keepdims=True)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
    assert kl.mean() < 1e-4


def test_tail_keeps_precision_when_topk_holds_nearly_all_mass():
    # Top-2 holds 1 - 1e-7 of the mass: 1 - sum(p) in float32 would round to 0 or worse.
    tail = 1e-7
    lps = np.log(np.array([[0.6, 0.4 - tail]], dtype=np.float64)).astype(np.float32)
    got = float(np.exp(tail_logprob(lps)[0]))
    assert got == pytest.approx(tail, rel=0.25)


def test_writer_refuses_a_dataset_made_by_another_teacher(tmp_path):
    write_dataset(tmp_path, 2)
    with pytest.raises(DatasetError, match="teacher_model"):
        ShardWriter(tmp_path, make_info(teacher_model="another"))


def test_record_with_wrong_shape_names_the_field():
    rng = np.random.default_rng(0)
    rec = make_record(rng, "x", 4, 2, 3)
    with pytest.raises(ValueError, match="token_logprob"):
        SequenceRecord(
            key="x",
            prompt_ids=rec.prompt_ids,
            completion_ids=rec.completion_ids,
            topk_ids=rec.topk_ids,
            topk_logprobs=rec.topk_logprobs,
            token_logprob=rec.token_logprob[:2],
        )


def test_reader_streams_one_row_group_at_a_time(tmp_path):
    write_dataset(tmp_path, 30, row_group_tokens=16)
    ds = ShardDataset(tmp_path)
    refs = ds.row_groups()
    assert len(refs) > 5
    assert sum(len(b) for b in ds.iter_decoded(refs)) == 30
    assert max(b.topk_ids.shape[0] for b in ds.iter_decoded(refs)) < 16 + 8


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time, numpy as np
    sys.path.insert(0, {tests!r})
    from test_shards import make_info, make_record
    from distillcache.shared.writer import ShardWriter
    rng = np.random.default_rng(0)
    writer = ShardWriter({root!r}, make_info(), max_shard_rows=50, row_group_tokens=80)
    # Two shards published, the third half written; the kill lands while it keeps
    # writing row groups into the third, never after it would be published (row 150).
    for i in range(145):
        writer.write(make_record(rng, f"key-{{i}}", 8, 4, 8))
        if i == 119:
            print("published", flush=True)
    time.sleep(60)
    """
)


def test_writer_killed_mid_shard_leaves_only_complete_verified_shards(tmp_path):
    script = _KILLED_WRITER.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "published"
    time.sleep(0.3)  # let it get well into the next shard
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    faults, notes = verify_dataset(tmp_path)
    assert faults == []
    assert any("temporary file of an interrupted write" in n for n in notes)
    ds = ShardDataset(tmp_path)
    assert ds.manifest.rows >= 100
    assert ds.manifest.rows % 50 == 0
    keys = [row.key for row in ds.iter_records(verify=True)]
    assert keys == [f"key-{i}" for i in range(len(keys))]


def _flip_one_byte(path: Path, where: int) -> None:
    data = bytearray(path.read_bytes())
    data[where] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_is_caught_by_distill_verify_naming_the_shard(tmp_path):
    write_dataset(tmp_path, 20, max_shard_rows=10)
    shard = tmp_path / read_manifest(tmp_path).shards[1].file
    _flip_one_byte(shard, shard.stat().st_size // 2)

    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code != 0
    assert shard.name in result.output
    assert "altered" in result.output


def test_truncated_shard_is_named_when_read(tmp_path):
    write_dataset(tmp_path, 10)
    shard = tmp_path / read_manifest(tmp_path).shards[0].file
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=shard.name):
        list(ShardDataset(tmp_path).iter_records())


def test_missing_shard_is_named(tmp_path):
    write_dataset(tmp_path, 10)
    shard = tmp_path / read_manifest(tmp_path).shards[0].file
    shard.unlink()
    faults, _ = verify_dataset(tmp_path)
    assert any(shard.name in f and "missing" in f for f in faults)


def test_verify_passes_on_a_sound_dataset(tmp_path):
    write_dataset(tmp_path, 10, max_shard_rows=4)
    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "3 shards" in result.output


def test_inspect_shows_rows_k_and_histograms(tmp_path):
    write_dataset(tmp_path, 10, k=8, codec="cbrt-u8")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for expected in (
        "rows",
        "10",
        "bytes / token",
        "tiny-teacher",
        "top-1 probability",
        "outside the top-k",
        "codec KL to exact (est.)",
    ):
        assert expected in result.output
    exact = tmp_path / "exact"
    write_dataset(exact, 3, k=8, codec="float32")
    result = CliRunner().invoke(app, ["inspect", str(exact)])
    assert "0.0e+00 nats / position" in result.output


CODECS = ["cbrt-u8", "float16", "float32"]


def _stored_columns(records: list[SequenceRecord], codec: str) -> dict[str, list]:
    """Every column as the shard must hold it, computed from the records (sorted by key)."""
    records = sorted(records, key=lambda r: r.key)
    topk = [canonical_topk(r.topk_ids, encode_logprobs(r.topk_logprobs, codec)) for r in records]
    return {
        "key": [r.key for r in records],
        "prompt_ids": [r.prompt_ids.tolist() for r in records],
        "completion_ids": [r.completion_ids.tolist() for r in records],
        "completion_text": [r.completion_text for r in records],
        "logprob_start": [r.logprob_start for r in records],
        "topk_ids": [ids.tolist() for ids, _ in topk],
        "topk_logprobs": [values.astype(np.float64).tolist() for _, values in topk],
        "token_logprob": [r.token_logprob.astype(np.float64).tolist() for r in records],
        "tail_logprob": [
            tail_logprob(r.topk_logprobs).astype(np.float64).tolist() for r in records
        ],
        "finish_reason": [r.finish_reason for r in records],
        "request": [r.request_json() for r in records],
        "meta": [r.meta_json() for r in records],
    }


def _plain(x):
    """Nested arrays, lists and numpy scalars -> nested Python lists of int/float/str."""
    if isinstance(x, str | None):
        return x
    if hasattr(x, "tolist"):
        return _plain(x.tolist())
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _by_key(columns: dict[str, list]) -> dict[str, list]:
    order = sorted(range(len(columns["key"])), key=lambda i: columns["key"][i])
    return {name: [_plain(values[i]) for i in order] for name, values in columns.items()}


@pytest.mark.parametrize("codec", CODECS)
def test_a_dataset_directory_opens_as_it_is_in_every_ecosystem_reader(tmp_path, codec):
    """Every column, every codec: pyarrow, pandas, polars, DuckDB and datasets on the dir."""
    import duckdb
    import pandas as pd
    import polars as pl
    from datasets import load_dataset

    root = tmp_path / "ds"
    records = write_dataset(root, 12, k=3, codec=codec, max_shard_rows=5)
    assert len(read_manifest(root).shards) == 3
    want = _stored_columns(records, codec)
    cols = list(want)
    got = {}
    t = pq.read_table(root)
    got["pyarrow"] = {c: t.column(c).to_pylist() for c in cols}
    df = pd.read_parquet(root)
    got["pandas"] = {c: df[c].tolist() for c in cols}
    pdf = pl.read_parquet(f"{root}/*.parquet")
    got["polars"] = {c: pdf[c].to_list() for c in cols}
    rel = duckdb.sql(f"SELECT {', '.join(cols)} FROM read_parquet('{root}/*.parquet')")
    got["duckdb"] = dict(zip(cols, map(list, zip(*rel.fetchall(), strict=True)), strict=True))
    hf = load_dataset("parquet", data_dir=str(root), split="train", cache_dir=str(tmp_path / "hf"))
    got["datasets"] = {c: hf[c] for c in cols}
    for reader, columns in got.items():
        columns = _by_key(columns)
        for c in cols:
            assert columns[c] == want[c], f"{reader}: column {c} differs ({codec})"


@pytest.mark.parametrize("codec", CODECS)
def test_documented_decodings_return_the_readers_log_probs(tmp_path, codec):
    """The SQL in the column's metadata and the pandas/polars one-liners of the docs."""
    import duckdb
    import pandas as pd
    import polars as pl

    write_dataset(tmp_path, 6, k=4, codec=codec, max_shard_rows=4)
    want = {row.key: row.topk_logprobs for row in ShardDataset(tmp_path).iter_records()}
    shard = next(tmp_path.glob("*.parquet"))
    field = pq.read_schema(shard).field("topk_logprobs")
    assert field.metadata[b"codec"] == codec.encode()
    file_meta = pq.read_metadata(shard).metadata
    assert file_meta[b"distillcache.topk_logprobs.codec"] == codec.encode()
    sql = field.metadata[b"decode_sql"].decode()
    assert file_meta[b"distillcache.topk_logprobs.decode_sql"].decode() == sql

    rows = duckdb.sql(
        f"SELECT key, list_transform(topk_logprobs, lambda pos: list_transform(pos, lambda x: {sql}))"
        f" FROM read_parquet('{tmp_path}/*.parquet')"
    ).fetchall()
    got = {"duckdb": dict(rows)}
    if codec == "cbrt-u8":  # docs/shard-format.md, "Reading shards without distillcache"
        df = pd.read_parquet(tmp_path)
        df["logprobs"] = df.topk_logprobs.map(
            lambda pos: 3 * np.log(np.maximum(np.stack(pos), 0.25) / 255)
        )
        lf = pl.read_parquet(f"{tmp_path}/*.parquet").with_columns(
            logprobs=pl.col("topk_logprobs").list.eval(
                pl.element().arr.eval(3 * (pl.element().cast(pl.Float64).clip(0.25) / 255).log())
            )
        )
    else:
        df = pd.read_parquet(tmp_path).assign(logprobs=lambda d: d.topk_logprobs)
        lf = pl.read_parquet(f"{tmp_path}/*.parquet").with_columns(logprobs=pl.col("topk_logprobs"))
    got["pandas"] = dict(zip(df.key, df.logprobs.map(np.stack), strict=True))
    got["polars"] = dict(zip(lf["key"], (np.array(v) for v in lf["logprobs"]), strict=True))
    for reader, values in got.items():
        assert set(values) == set(want)
        for key, lps in values.items():
            # The reader's float32 values are the float64 formula rounded once.
            np.testing.assert_array_equal(
                np.asarray(lps, dtype=np.float64).astype(np.float32), want[key], err_msg=reader
            )


def test_documented_one_liners_order_a_position_by_probability(tmp_path):
    import duckdb

    records = write_dataset(tmp_path, 4, k=5, codec="cbrt-u8")
    top1 = {
        r.key: np.take_along_axis(r.topk_ids, r.topk_logprobs.argmax(1)[:, None], 1)[:, 0]
        for r in records
    }
    for row in ShardDataset(tmp_path).iter_records():
        ids, lps = row.topk_ids, row.topk_logprobs
        by_prob = np.take_along_axis(ids, np.argsort(-lps, axis=-1, kind="stable"), axis=-1)
        assert by_prob[:, 0].tolist() == top1[row.key].tolist()
    rows = duckdb.sql(
        "SELECT key, list_transform(list_zip(topk_ids, topk_logprobs),"
        " lambda p: list_transform(list_grade_up(p[2], 'DESC'), lambda i: p[1][i]))"
        f" FROM read_parquet('{tmp_path}/*.parquet')"
    ).fetchall()
    for key, positions in rows:
        assert [pos[0] for pos in positions] == top1[key].tolist()


def test_export_to_float32_gives_plain_floats_and_keeps_the_metadata_true(tmp_path):
    import pandas as pd

    src, out = tmp_path / "src", tmp_path / "out"
    write_dataset(src, 7, k=4, codec="cbrt-u8", max_shard_rows=3)
    result = CliRunner().invoke(app, ["export", str(src), str(out), "--codec", "float32"])
    assert result.exit_code == 0, result.output
    assert "7 rows" in result.output
    info = read_manifest(out).info
    assert (info.logprob_codec, info.precision, info.exact_as) == ("float32", "cbrt-u8", "cbrt-u8")
    want = {row.key: row for row in ShardDataset(src).iter_records()}
    df = pd.read_parquet(out)
    for key, topk in zip(df.key, df.topk_logprobs, strict=True):
        assert np.stack(topk).dtype == np.float32
        np.testing.assert_array_equal(np.stack(topk), want[key].topk_logprobs)
    for row in ShardDataset(out).iter_records():
        np.testing.assert_array_equal(row.tail_logprob, want[row.key].tail_logprob)
        np.testing.assert_array_equal(row.topk_ids, want[row.key].topk_ids)
    again = CliRunner().invoke(app, ["export", str(src), str(out)])
    assert again.exit_code == 1 and "already a dataset" in again.output


def test_shard_files_carry_the_dataset_info_in_parquet_metadata(tmp_path):
    write_dataset(tmp_path, 3)
    shard = tmp_path / read_manifest(tmp_path).shards[0].file
    meta = pq.read_schema(shard).metadata[b"distillcache"]
    info = DatasetInfo.model_validate_json(meta)
    assert info == make_info()
    assert os.path.getsize(shard) == read_manifest(tmp_path).shards[0].bytes


def test_the_trainer_sees_the_same_example_whatever_the_codec(tmp_path):
    """Same keys, ids, tails and shapes; log-probs differ only by each codec's rounding."""
    from distillcache.trainer.stream import ShardSource

    examples = {}
    for codec in CODECS:
        write_dataset(tmp_path / codec, 6, k=5, codec=codec, seed=3, max_shard_rows=4)
        source = ShardSource(tmp_path / codec)
        examples[codec] = [e for unit in source.units() for e in source.load(unit)]
    records = {r.key: r for r in write_dataset(tmp_path / "again", 6, k=5, seed=3)}
    for codec, got in examples.items():
        assert [e.key for e in got] == [e.key for e in examples["float32"]]
        for example in got:
            record = records[example.key]
            ids, exact = canonical_topk(record.topk_ids, record.topk_logprobs)
            np.testing.assert_array_equal(example.completion_ids, record.completion_ids)
            np.testing.assert_array_equal(example.topk_ids, ids)
            assert example.topk_logprobs.dtype == np.float32
            np.testing.assert_array_equal(
                example.topk_logprobs, decode_logprobs(encode_logprobs(exact, codec), codec)
            )
            np.testing.assert_array_equal(example.tail_logprob, tail_logprob(record.topk_logprobs))
