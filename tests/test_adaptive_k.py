"""Adaptive k: the writer keeps each position's most likely entries up to a rule.

The reference below applies the rule position by position in float64 Python, the way
docs/shard-format.md states it; the writer's vectorized version must keep exactly the
same ids, and the tail must hold exactly what was dropped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_shards import make_info, make_record

from distillcache.shared.reader import PAD_ID, ShardDataset
from distillcache.shared.schema import AdaptiveK
from distillcache.shared.writer import ShardWriter

K = 12


def kept_count(p: list[float], rule: AdaptiveK) -> int:
    """How many of one position's entries ``rule`` keeps, from their probabilities most
    likely first, as docs/shard-format.md states the rule (float64, one at a time)."""
    wanted = 0
    if rule.mass is not None:
        total, wanted = 0.0, len(p)
        for n, pi in enumerate(p, start=1):
            total += pi
            if total >= rule.mass:
                wanted = n
                break
    if rule.min_prob is not None:
        wanted = max(wanted, sum(pi >= rule.min_prob for pi in p))
    return min(max(wanted, rule.min_k), len(p))


def reference(record, rule: AdaptiveK):
    """(kept ids sorted by id, their log-probs, tail log-prob) per position, in float64."""
    out = []
    for ids, lps in zip(record.topk_ids, record.topk_logprobs, strict=True):
        order = sorted(range(K), key=lambda i: -float(lps[i]))
        p = [math.exp(float(lps[i])) for i in order]
        n = kept_count(p, rule)
        kept = sorted(order[:n], key=lambda i: int(ids[i]))
        kept_mass = sum(p[:n])
        out.append(
            (
                [int(ids[i]) for i in kept],
                [float(lps[i]) for i in kept],
                math.log(1.0 - kept_mass) if kept_mass < 1.0 else -math.inf,
            )
        )
    return out


@pytest.mark.parametrize(
    "rule",
    [
        AdaptiveK(mass=0.6),
        AdaptiveK(min_prob=0.02, min_k=2),
        AdaptiveK(mass=0.3, min_prob=0.05),
        AdaptiveK(mass=1.0),
    ],
    ids=["mass", "min_prob", "both", "all"],
)
def test_adaptive_k_keeps_what_the_rule_says_and_the_tail_holds_the_rest(tmp_path, rule):
    rng = np.random.default_rng(5)
    records = [make_record(rng, f"k{i}", K, 2, 7) for i in range(6)]
    with ShardWriter(tmp_path, make_info(K, "float32", adaptive=rule)) as writer:
        writer.write_many(records)
    counts_seen = set()
    for row, record in zip(ShardDataset(tmp_path).iter_records(), records, strict=True):
        for j, (ids, lps, tail) in enumerate(reference(record, rule)):
            n = len(ids)
            counts_seen.add(n)
            assert row.topk_ids[j, :n].tolist() == ids
            np.testing.assert_array_equal(row.topk_logprobs[j, :n], np.float32(lps))
            assert (row.topk_ids[j, n:] == PAD_ID).all()
            assert np.isneginf(row.topk_logprobs[j, n:]).all()
            assert row.tail_logprob[j] == pytest.approx(tail, rel=1e-5, abs=1e-6)
    if rule.mass != 1.0:
        assert len(counts_seen) > 1, "the data should make positions keep different counts"


def test_adaptive_k_adds_dropped_mass_to_a_tail_the_backend_gave(tmp_path):
    rng = np.random.default_rng(9)
    record = make_record(rng, "k", K, 2, 4)
    given = np.log(np.full(record.n_scored, 0.01, dtype=np.float64)).astype(np.float32)
    record.tail_logprob = given
    rule = AdaptiveK(mass=0.5)
    with ShardWriter(tmp_path, make_info(K, "float32", adaptive=rule)) as writer:
        writer.write(record)
    row = next(ShardDataset(tmp_path).iter_records())
    for j, (ids, _, _) in enumerate(reference(record, rule)):
        dropped = sum(
            math.exp(float(lp))
            for i, lp in zip(record.topk_ids[j], record.topk_logprobs[j], strict=True)
            if int(i) not in ids
        )
        assert row.tail_logprob[j] == pytest.approx(math.log(0.01 + dropped), rel=1e-5)


def test_adaptive_k_refuses_a_rule_with_nothing_to_apply():
    with pytest.raises(ValueError, match="mass, min_prob"):
        AdaptiveK()


def test_an_adaptive_dataset_opens_as_it_is_in_every_ecosystem_reader(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.parquet as pq
    from datasets import load_dataset
    from test_shards import _by_key

    from distillcache.shared.codec import encode_logprobs

    rule = AdaptiveK(mass=0.5, min_k=2)
    rng = np.random.default_rng(2)
    records = [make_record(rng, f"k{i:02d}", K, 2, 5) for i in range(9)]
    root = tmp_path / "ds"
    with ShardWriter(root, make_info(K, "cbrt-u8", adaptive=rule), max_shard_rows=4) as writer:
        writer.write_many(records)
    want = {"key": [], "topk_ids": [], "topk_logprobs": []}
    for record in sorted(records, key=lambda r: r.key):
        ref = reference(record, rule)
        want["key"].append(record.key)
        want["topk_ids"].append([ids for ids, _, _ in ref])
        want["topk_logprobs"].append(
            [encode_logprobs(np.float32(lps), "cbrt-u8").tolist() for _, lps, _ in ref]
        )
    cols = list(want)
    t = pq.read_table(root)
    df = pd.read_parquet(root)
    lf = pl.read_parquet(f"{root}/*.parquet")
    rel = duckdb.sql(f"SELECT {', '.join(cols)} FROM read_parquet('{root}/*.parquet')").fetchall()
    hf = load_dataset("parquet", data_dir=str(root), split="train", cache_dir=str(tmp_path / "hf"))
    got = {
        "pyarrow": {c: t.column(c).to_pylist() for c in cols},
        "pandas": {c: df[c].tolist() for c in cols},
        "polars": {c: lf[c].to_list() for c in cols},
        "duckdb": dict(zip(cols, map(list, zip(*rel, strict=True)), strict=True)),
        "datasets": {c: hf[c] for c in cols},
    }
    for reader, columns in got.items():
        assert _by_key(columns) == want, reader


def test_the_trainer_reads_each_position_padded_and_cross_tokenizer_refuses_it(tmp_path):
    from distillcache.shared.manifest import DatasetError
    from distillcache.trainer.aligned_data import AlignedShardSource
    from distillcache.trainer.stream import ShardSource

    rng = np.random.default_rng(0)
    rule = AdaptiveK(mass=0.5)
    record = make_record(rng, "k", K, 2, 5)
    with ShardWriter(tmp_path, make_info(K, adaptive=rule)) as writer:
        writer.write(record)
    source = ShardSource(tmp_path)
    [example] = source.load(source.units()[0])
    for j, (ids, lps, tail) in enumerate(reference(record, rule)):
        n = len(ids)
        assert example.topk_ids[j, :n].tolist() == ids
        np.testing.assert_array_equal(example.topk_logprobs[j, :n], np.float32(lps))
        assert (example.topk_ids[j, n:] == PAD_ID).all()
        assert np.isneginf(example.topk_logprobs[j, n:]).all()
        assert example.tail_logprob[j] == pytest.approx(tail, rel=1e-5, abs=1e-6)
    # The alignment reads id -1 as an unmatched student id: refused before it can.
    with pytest.raises(DatasetError, match="adaptive k.*across tokenizers.*fixed k"):
        AlignedShardSource(tmp_path, retokenizer=None)


def test_exporting_an_adaptive_dataset_keeps_every_position_as_it_was(tmp_path):
    from distillcache.shared.export import export_dataset

    rng = np.random.default_rng(1)
    src, out = tmp_path / "src", tmp_path / "out"
    rule = AdaptiveK(mass=0.7, min_k=2)
    with ShardWriter(src, make_info(K, "cbrt-u8", adaptive=rule)) as writer:
        writer.write_many(make_record(rng, f"k{i}", K, 2, 6) for i in range(4))
    manifest = export_dataset(src, out, "float32")
    assert manifest.info.adaptive == rule and manifest.info.precision == "cbrt-u8"
    for a, b in zip(
        ShardDataset(src).iter_records(), ShardDataset(out).iter_records(), strict=True
    ):
        for column in ("topk_ids", "topk_logprobs", "tail_logprob", "token_logprob"):
            np.testing.assert_array_equal(getattr(a, column), getattr(b, column), err_msg=column)
