"""Adaptive k and the cache: which stored rows may answer which store.

A store with an adaptive-k rule keeps, per position, the entries its rule keeps; a row
answers it only when the row kept at least those (``schema.adaptive_answers``). The rule
is not in the key, so the store must tell rows apart by their dataset's rule: these
tests put real rows in real datasets under one data root and look them up through
stores with other rules, published and still pending, and compare every answer with the
rule applied to the full top-k by an independent float64 reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_adaptive_k import kept_count

from distillcache.services.teacher.identity import TeacherIdentity
from distillcache.services.teacher.store import TeacherStore
from distillcache.shared.reader import PAD_ID
from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import AdaptiveK, Sampling, adaptive_answers
from distillcache.shared.writer import adaptive_counts, adaptive_cut

K = 8
VOCAB = 60
IDENTITY = TeacherIdentity(
    model_id="tiny/teacher",
    revision="r1",
    tokenizer="tiny/teacher",
    tokenizer_hash="0" * 64,
    vocab_size=VOCAB,
    logit_width=64,
    backend="transformers",
    backend_version="test",
    dtype="float32",
)
WIDE = AdaptiveK(mass=0.9, min_k=2)
NARROW = AdaptiveK(mass=0.6, min_k=1)  # covered by WIDE
OTHER = AdaptiveK(min_prob=0.01)  # not covered by WIDE: it has no min_prob part


def record(i: int, n: int = 6) -> SequenceRecord:
    rng = np.random.default_rng(i)
    logits = rng.normal(scale=2.5, size=(n, VOCAB))
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-logprobs, axis=1)[:, :K]
    return SequenceRecord(
        key=f"{i:064x}",
        prompt_ids=[1, 2, i],
        completion_ids=ids[:, 0],
        topk_ids=ids,
        topk_logprobs=np.take_along_axis(logprobs, ids, axis=1).astype(np.float32),
        token_logprob=np.take_along_axis(logprobs, ids[:, :1], axis=1)[:, 0],
        completion_text=f"text {i}",
        finish_reason="length",
        request={"mode": "generate", "k": K},
    )


def store(root, rule: AdaptiveK | None) -> TeacherStore:
    return TeacherStore(
        root,
        IDENTITY,
        codec="float32",
        flush_rows=10_000,
        flush_seconds=1e9,
        row_group_tokens=16,
        adaptive=rule,
    )


def kept_by(record: SequenceRecord, rule: AdaptiveK | None):
    """Per position, {id: log-prob} of the entries ``rule`` keeps of the full top-k, and
    the tail; float64, one position at a time, as docs/shard-format.md states the rule."""
    out = []
    for ids, lps, tail in zip(
        record.topk_ids, record.topk_logprobs, record.tail_logprob, strict=True
    ):
        order = sorted(range(K), key=lambda i: -float(lps[i]))
        p = [math.exp(float(lps[i])) for i in order]
        n = K if rule is None else kept_count(p, rule)
        dropped = sum(p[n:])
        out.append(
            (
                {int(ids[i]): float(lps[i]) for i in order[:n]},
                math.log(math.exp(float(tail)) + dropped),
            )
        )
    return out


def assert_answers_as(got: SequenceRecord, full: SequenceRecord, rule: AdaptiveK | None):
    for j, (want, tail) in enumerate(kept_by(full, rule)):
        real = got.topk_ids[j] != PAD_ID
        assert dict(
            zip(got.topk_ids[j][real].tolist(), got.topk_logprobs[j][real].tolist(), strict=True)
        ) == pytest.approx(want, rel=1e-6)
        assert np.isneginf(got.topk_logprobs[j][~real]).all()
        assert float(got.tail_logprob[j]) == pytest.approx(tail, rel=1e-5, abs=1e-7)


def lookup(root, writer: TeacherStore, published: bool, rule, keys):
    """``keys`` looked up by a store with ``rule``: a new one over the data root once the
    rows are published; the writing store itself (its pending rows) before."""
    if published:
        return store(root, rule).lookup(keys)
    own = writer.adaptive
    writer.adaptive = rule
    try:
        return writer.lookup(keys)
    finally:
        writer.adaptive = own


@pytest.mark.parametrize("published", [True, False], ids=["published", "pending"])
def test_a_full_top_k_row_answers_every_rule_cut_as_the_rule_says(tmp_path, published):
    rows = [record(i) for i in range(4)]
    keys = [r.key for r in rows]
    writer = store(tmp_path, None)
    writer.open_dataset("full", K, Sampling())
    writer.put("full", rows)
    if published:
        writer.flush()
    for rule in (WIDE, OTHER, None):
        found = lookup(tmp_path, writer, published, rule, keys)
        assert set(found) == set(keys)
        for r in rows:
            shaped = (
                found[r.key].record if rule is None else adaptive_cut(found[r.key].record, rule)
            )
            assert_answers_as(shaped, r, rule)


@pytest.mark.parametrize("published", [True, False], ids=["published", "pending"])
def test_a_cut_row_answers_only_a_rule_it_covers_and_never_the_full_top_k(tmp_path, published):
    rows = [record(i) for i in range(4)]
    keys = [r.key for r in rows]
    # Rows some positions of which WIDE really cuts: a full top-k asked of them would be
    # answered with less than asked.
    assert any(len(kept) < K for r in rows for kept, _ in kept_by(r, WIDE))
    writer = store(tmp_path, WIDE)
    writer.open_dataset("wide", K, Sampling())
    writer.put("wide", rows)
    if published:
        writer.flush()
        assert writer.index.contains("wide", keys) == set(keys)
    refused = {
        "the full top-k": None,
        "a rule with a part WIDE lacks": OTHER,
        "a larger mass": AdaptiveK(mass=0.95, min_k=2),
        "a larger min_k": AdaptiveK(mass=0.9, min_k=3),
    }
    for what, rule in refused.items():
        assert lookup(tmp_path, writer, published, rule, keys) == {}, what
    for rule in (WIDE, NARROW):
        found = lookup(tmp_path, writer, published, rule, keys)
        assert set(found) == set(keys)
        for r in rows:
            assert_answers_as(adaptive_cut(found[r.key].record, rule), r, rule)


def test_the_live_dataset_of_a_rule_is_its_own(tmp_path):
    names = {
        IDENTITY.live_dataset(K),
        IDENTITY.live_dataset(K, WIDE),
        IDENTITY.live_dataset(K, NARROW),
    }
    assert len(names) == 3


rules = (
    st.tuples(
        st.one_of(st.none(), st.floats(0.05, 1.0)),
        st.one_of(st.none(), st.floats(1e-4, 0.5)),
        st.integers(1, K),
    )
    .filter(lambda t: t[0] is not None or t[1] is not None)
    .map(lambda t: AdaptiveK(mass=t[0], min_prob=t[1], min_k=t[2]))
)


@st.composite
def wider(draw, rule: AdaptiveK) -> AdaptiveK:
    """A rule that covers ``rule``: each part as large (mass, min_k) or small (min_prob)."""
    mass = None if rule.mass is None else draw(st.floats(rule.mass, 1.0))
    min_prob = None if rule.min_prob is None else draw(st.floats(1e-5, rule.min_prob))
    return AdaptiveK(mass=mass, min_prob=min_prob, min_k=draw(st.integers(rule.min_k, K)))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), wanted=rules, seed=st.integers(0, 2**16))
def test_a_rule_that_covers_another_keeps_at_least_its_entries_everywhere(data, wanted, seed):
    """What ``covers`` promises, on random distributions: the cache-hit rule rests on it.
    Half the stored rules are built to cover ``wanted``, half drawn freely."""
    stored = data.draw(st.one_of(wider(wanted), rules))
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=rng.uniform(0.5, 5.0), size=(64, VOCAB))
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    top = -np.sort(-logprobs, axis=1)[:, :K].astype(np.float32)
    kept, _ = adaptive_counts(top, stored)
    need, _ = adaptive_counts(top, wanted)
    if adaptive_answers(stored, wanted):
        assert (kept >= need).all()
    # And a rule that keeps fewer entries somewhere must not count as covering.
    if (kept < need).any():
        assert not adaptive_answers(stored, wanted)


@pytest.mark.parametrize("codec", ["float32", "float16", "cbrt-u8"])
def test_an_http_answer_lists_only_the_kept_entries_most_likely_first(codec):
    """The padding is no entry in the JSON answer, whatever the codec makes of its -inf
    (cbrt-u8's smallest code decodes to a number)."""
    from distillcache.services.teacher.protocol import AnswerResponse
    from distillcache.services.teacher.store import Answer
    from distillcache.shared.codec import decode_logprobs, encode_logprobs

    full = record(3)
    # A sure position: min_k keeps an entry so unlikely (1e-12) that cbrt-u8 stores it
    # as code 0, the code the padding's -inf gets too.
    full.topk_logprobs[0] = np.log(np.float32([1.0 - 7e-12] + [1e-12] * (K - 1)))
    cut = adaptive_cut(full, WIDE)
    response = AnswerResponse.of(Answer(cut, False, None), codec)
    assert len(response.topk_ids[0]) == WIDE.min_k
    for j, (want, _) in enumerate(kept_by(full, WIDE)):
        ids = [int(i) for i in sorted(want, key=lambda i: (-want[i], i))]
        coded = decode_logprobs(encode_logprobs(np.float32([want[i] for i in ids]), codec), codec)
        assert response.topk_ids[j] == ids
        assert response.topk_logprobs[j] == pytest.approx(coded.tolist())
