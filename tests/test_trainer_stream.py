"""The shard stream and batching: rank split, seeded windows, exact positions, alignment."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import DatasetInfo
from distillcache.shared.writer import ShardWriter
from distillcache.trainer.batching import iter_batches
from distillcache.trainer.stream import (
    DataPosition,
    Example,
    ShardSource,
    iter_examples,
    iter_held_out,
    rank_units,
    split_held_out,
)

VOCAB, K = 100, 4


def synthetic_dataset(root: Path, rows: int = 60, row_group_tokens: int = 40, seed: int = 0):
    """Rows with random ids whose top-k rows encode (row, completion index) for checking."""
    rng = np.random.default_rng(seed)
    info = DatasetInfo(
        teacher_model="synthetic",
        tokenizer="synthetic",
        tokenizer_hash="0" * 64,
        vocab_size=VOCAB,
        logit_width=VOCAB,
        k=K,
        logprob_codec="float32",
        backend="test",
        backend_version="0",
    )
    records = []
    with ShardWriter(root, info, writer_id="w", row_group_tokens=row_group_tokens) as writer:
        for i in range(rows):
            prompt = rng.integers(0, VOCAB, rng.integers(1, 6))
            completion = rng.integers(0, VOCAB, rng.integers(1, 9))
            start = int(rng.integers(1, len(prompt) + 1))
            n = len(prompt) + len(completion) - start
            ids = np.stack([rng.choice(VOCAB, K, replace=False) for _ in range(n)])
            logprobs = np.log(rng.dirichlet(np.ones(K + 1), n)[:, :K]).astype(np.float32)
            record = SequenceRecord(
                key=f"row-{i:04d}",
                prompt_ids=prompt,
                completion_ids=completion,
                logprob_start=start,
                topk_ids=ids,
                topk_logprobs=logprobs,
                token_logprob=np.zeros(n, np.float32),
            )
            writer.write(record)
            records.append(record)
        # Several shards, so that units span files.
        if rows > 20:
            writer.flush()
    return root, {r.key: r for r in records}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.mktemp("stream"))


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_ranks_read_disjoint_row_groups_that_together_cover_the_epoch(dataset):
    root, records = dataset
    source = ShardSource(root)
    units = source.units()
    assert len(units) >= 6
    per_rank = [rank_units(units, seed=3, epoch=0, rank=r, world=3) for r in range(3)]
    names = [{source.unit_name(u) for u in mine} for mine in per_rank]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert set.union(*names) == {source.unit_name(u) for u in units}
    keys = []
    for rank in range(3):
        unit_rows = sum(u.rows for u in per_rank[rank])
        stream = iter_examples(source, units, seed=3, rank=rank, world=3, window_rows=7)
        keys.append([e.key for e, _ in take(stream, unit_rows)])
    assert sorted(itertools.chain(*keys)) == sorted(records)


def test_rank_split_refuses_more_ranks_than_row_groups(dataset):
    units = ShardSource(dataset[0]).units()
    with pytest.raises(ValueError, match="every rank needs at least one"):
        rank_units(units, seed=0, epoch=0, rank=0, world=len(units) + 1)


def test_order_is_seeded_and_reshuffled_each_epoch(dataset):
    source = ShardSource(dataset[0])
    units = source.units()
    epoch_rows = sum(u.rows for u in units)

    def order(seed):
        stream = iter_examples(source, units, seed=seed, rank=0, world=1, window_rows=16)
        return [e.key for e, _ in take(stream, 2 * epoch_rows)]

    first = order(5)
    assert first == order(5)
    assert first != order(6)
    assert sorted(first[:epoch_rows]) == sorted(first[epoch_rows:])
    assert first[:epoch_rows] != first[epoch_rows:]


def test_stream_resumed_from_any_position_continues_with_the_next_example(dataset):
    source = ShardSource(dataset[0])
    units = source.units()
    stream = iter_examples(source, units, seed=1, rank=1, world=2, window_rows=9)
    straight = take(stream, 80)
    for cut in (0, 1, 9, 23, 41, 79):
        _, position = straight[cut]
        resumed = iter_examples(
            source, units, seed=1, rank=1, world=2, window_rows=9, start=position
        )
        expected = [e.key for e, _ in straight[cut + 1 :]]
        assert [e.key for e, _ in take(resumed, len(expected))] == expected


class CountingSource(ShardSource):
    """A real shard source that records which units were loaded, and when."""

    def __init__(self, root):
        super().__init__(root)
        self.loaded = []

    def load(self, unit):
        self.loaded.append(unit)
        return super().load(unit)


def test_stream_holds_one_window_of_row_groups_not_the_dataset(dataset):
    source = CountingSource(dataset[0])
    units = source.units()
    stream = iter_examples(source, units, seed=0, rank=0, world=1, window_rows=10)
    next(stream)
    loaded_rows = sum(u.rows for u in source.loaded)
    largest = max(u.rows for u in units)
    assert loaded_rows < 10 + largest
    assert len(source.loaded) < len(units)


def test_examples_align_teacher_rows_with_completion_tokens(dataset):
    root, records = dataset
    source = ShardSource(root)
    seen = 0
    for unit in source.units():
        for example in source.load(unit):
            record = records[example.key]
            first = len(record.prompt_ids) - record.logprob_start
            assert np.array_equal(example.completion_ids, record.completion_ids)
            assert len(example.topk_ids) == len(record.completion_ids)
            for j in range(len(record.completion_ids)):
                order = np.argsort(record.topk_ids[first + j])
                assert np.array_equal(example.topk_ids[j], record.topk_ids[first + j][order])
                np.testing.assert_allclose(
                    example.topk_logprobs[j], record.topk_logprobs[first + j][order]
                )
            seen += 1
    assert seen == len(records)


def test_held_out_split_is_disjoint_stable_and_independent_of_order(dataset):
    source = ShardSource(dataset[0])
    units = source.units()
    train, held = split_held_out(units, 0.25, source.unit_name)
    assert held and train and not set(train) & set(held)
    assert set(train) | set(held) == set(units)
    train2, held2 = split_held_out(list(reversed(units)), 0.25, source.unit_name)
    assert set(held2) == set(held)
    rows = [list(iter_held_out(source, held, rank=r, world=2)) for r in range(2)]
    assert abs(len(rows[0]) - len(rows[1])) <= 1
    assert not {e.key for e in rows[0]} & {e.key for e in rows[1]}


def example(key, prompt, completion, k=None):
    topk = None
    if k:
        topk = np.tile(np.arange(k), (len(completion), 1))
    return Example(
        key,
        np.asarray(prompt, np.int32),
        np.asarray(completion, np.int32),
        topk,
        None if topk is None else np.zeros(topk.shape, np.float32),
        None if topk is None else np.zeros(len(completion), np.float32),
    )


def positioned(examples):
    return [(e, DataPosition(0, 0, i + 1)) for i, e in enumerate(examples)]


def test_padded_batch_targets_are_the_completion_tokens_predicted_from_the_position_before():
    examples = [example("a", [1, 2, 3], [4, 5]), example("b", [6], [7, 8, 9, 10])]
    ((batch, position),) = iter_batches(
        positioned(examples), batch_size=2, max_length=32, pad_id=0, packing=False
    )
    assert batch.input_ids.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert batch.labels.tolist() == [4, 5, 7, 8, 9, 10]
    assert batch.target_rows.tolist() == [0, 0, 1, 1, 1, 1]
    assert batch.target_cols.tolist() == [2, 3, 0, 1, 2, 3]
    # Each target is the token the next input position holds (where there is one).
    for row, col, label in zip(batch.target_rows, batch.target_cols, batch.labels, strict=True):
        if col + 1 < batch.input_ids.shape[1] and batch.attention_mask[row, col + 1]:
            assert batch.input_ids[row, col + 1] == label
    assert position == DataPosition(0, 0, 2)


def test_padding_fills_to_the_longest_sequence_and_is_masked():
    examples = [example("a", [1], [2]), example("b", [3, 4, 5], [6, 7])]
    ((batch, _),) = iter_batches(
        positioned(examples), batch_size=2, max_length=32, pad_id=99, packing=False
    )
    assert batch.input_ids.tolist() == [[1, 99, 99, 99], [3, 4, 5, 6]]
    assert batch.attention_mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]


def test_packing_restarts_positions_per_sequence_and_keeps_batches_contiguous():
    examples = [
        example("a", [1, 2], [3, 4]),  # 3 input positions
        example("b", [5], [6, 7, 8]),  # 3
        example("c", [9, 10, 11], [12, 13]),  # 4
        example("d", [14], [15]),  # 1
    ]
    batches = list(
        iter_batches(positioned(examples), batch_size=1, max_length=7, pad_id=0, packing=True)
    )
    first, second = batches[0][0], batches[1][0]
    assert first.keys == ["a", "b"] and batches[0][1] == DataPosition(0, 0, 2)
    assert first.attention_mask is None
    assert first.input_ids.tolist() == [[1, 2, 3, 5, 6, 7]]
    assert first.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert first.target_cols.tolist() == [1, 2, 3, 4, 5]
    assert second.keys == ["c", "d"]
    assert second.position_ids.tolist() == [[0, 1, 2, 3, 0]]


def test_long_examples_lose_the_end_of_their_completion_and_hopeless_ones_are_skipped():
    examples = [example("long", [1, 2], [3, 4, 5, 6, 7], k=2), example("bad", [1] * 9, [2])]
    batches = list(
        iter_batches(positioned(examples), batch_size=4, max_length=4, pad_id=0, packing=False)
    )
    ((batch, position),) = batches
    assert batch.keys == ["long"]
    assert batch.input_ids.tolist() == [[1, 2, 3, 4]]
    assert batch.labels.tolist() == [3, 4, 5]
    assert batch.topk_ids.shape == (3, 2)
    assert position == DataPosition(0, 0, 2)


def test_a_stream_where_nothing_fits_max_length_fails_instead_of_spinning():
    endless = ((example("long", [1] * 50, [2]), DataPosition()) for _ in itertools.count())
    with pytest.raises(ValueError, match="raise --max-length"):
        next(iter_batches(endless, batch_size=2, max_length=8, pad_id=0, packing=False))


def test_batches_carry_the_teacher_top_k_row_of_each_target(dataset):
    root, records = dataset
    source = ShardSource(root)
    examples = source.load(source.units()[0])
    (batch, _), *_ = iter_batches(
        positioned(examples), batch_size=len(examples), max_length=64, pad_id=0, packing=False
    )
    expected = torch.from_numpy(np.concatenate([e.topk_ids for e in examples])).long()
    assert torch.equal(batch.topk_ids, expected)
    assert batch.topk_logprobs.shape == (batch.n_targets, K)
