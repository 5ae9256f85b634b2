"""The cache's promise: a hit returns exactly what the teacher that was asked would have
produced, at least as exactly as asked, under metadata that stays true.

Each test runs the real teacher runtime in-process (transformers backend, tiny model)
and counts teacher runs with the service's own metric. Every field that changes an
answer, changed alone, must miss the cache and never be served the old answer; fields
that cannot change it (a greedy request's seed, the path the model was loaded from) must
hit.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from service_support import metric_value

from distillcache.services.teacher.backend import Query
from distillcache.services.teacher.identity import model_revision
from distillcache.services.teacher.metrics import ServiceMetrics
from distillcache.services.teacher.runtime import Runtime, build_runtime, open_backend
from distillcache.services.teacher.settings import TeacherSettings
from distillcache.shared.manifest import DatasetError
from distillcache.shared.reader import ShardDataset
from distillcache.shared.schema import Sampling

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = (1, 5, 9, 13, 17, 21)
OTHER_PROMPT = (1, 5, 9, 13, 17, 22)
COMPLETION = (30, 31, 32, 33)
SAMPLED = Sampling(max_tokens=4, temperature=1.0, top_p=0.9, seed=1)


def teacher_runs(metrics: ServiceMetrics) -> int:
    return int(metric_value(metrics.exposition().decode(), "distill_teacher_sequences_total"))


def with_runtime(settings: TeacherSettings, scenario: Callable[[Runtime], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        runtime = await build_runtime(settings, await open_backend(settings), ServiceMetrics())
        try:
            return await scenario(runtime)
        finally:
            await runtime.close()

    return asyncio.run(run())


@pytest.fixture
def settings(tmp_path: Path, teacher_model: Path) -> TeacherSettings:
    return TeacherSettings(model=str(teacher_model), data_root=tmp_path / "data", flush_rows=1)


BASE_GENERATE = Query("generate", PROMPT, 4, sampling=SAMPLED)
BASE_SCORE = Query("score", PROMPT, 4, completion_ids=COMPLETION)
CHANGED_ALONE = {
    "k": (BASE_GENERATE, Query("generate", PROMPT, 5, sampling=SAMPLED)),
    "temperature": (
        BASE_GENERATE,
        Query("generate", PROMPT, 4, sampling=SAMPLED.model_copy(update={"temperature": 0.7})),
    ),
    "top_p": (
        BASE_GENERATE,
        Query("generate", PROMPT, 4, sampling=SAMPLED.model_copy(update={"top_p": 0.8})),
    ),
    "seed": (
        BASE_GENERATE,
        Query("generate", PROMPT, 4, sampling=SAMPLED.model_copy(update={"seed": 2})),
    ),
    "max_tokens": (
        BASE_GENERATE,
        Query("generate", PROMPT, 4, sampling=SAMPLED.model_copy(update={"max_tokens": 5})),
    ),
    "prompt": (BASE_GENERATE, Query("generate", OTHER_PROMPT, 4, sampling=SAMPLED)),
    "completion": (BASE_SCORE, Query("score", PROMPT, 4, completion_ids=(30, 31, 32, 34))),
    "logprob_start": (
        BASE_SCORE,
        Query("score", PROMPT, 4, completion_ids=COMPLETION, logprob_start=3),
    ),
    "score k": (BASE_SCORE, Query("score", PROMPT, 3, completion_ids=COMPLETION)),
    "mode": (
        BASE_SCORE,
        Query("generate", PROMPT, 4, sampling=Sampling(max_tokens=len(COMPLETION))),
    ),
}


@pytest.mark.parametrize("field", list(CHANGED_ALONE))
def test_a_field_changed_alone_misses_the_cache_and_never_gets_the_old_answer(settings, field):
    base, changed = CHANGED_ALONE[field]

    async def scenario(rt: Runtime) -> None:
        [first] = await rt.service.answer([base])
        [again] = await rt.service.answer([base])
        assert again.cached and again.record.key == first.record.key
        runs = teacher_runs(rt.service.metrics)
        [other] = await rt.service.answer([changed])
        assert not other.cached, f"changing {field} alone was answered from the cache"
        assert other.record.key != first.record.key
        assert teacher_runs(rt.service.metrics) == runs + 1
        assert other.record.request != first.record.request or field in ("prompt", "completion")

    with_runtime(settings, scenario)


def test_greedy_requests_differing_only_in_seed_or_top_p_run_the_teacher_once(settings):
    greedy = [
        Query("generate", PROMPT, 4, sampling=Sampling(max_tokens=4, top_p=p, seed=s))
        for p, s in ((1.0, None), (0.5, None), (1.0, 7), (0.3, 123))
    ]

    async def scenario(rt: Runtime) -> None:
        answers = [(await rt.service.answer([q]))[0] for q in greedy]
        assert [a.cached for a in answers] == [False, True, True, True]
        assert teacher_runs(rt.service.metrics) == 1

    with_runtime(settings, scenario)


def test_identical_concurrent_queries_cost_one_teacher_run(settings):
    async def scenario(rt: Runtime) -> None:
        answers = await asyncio.gather(*(rt.service.answer([BASE_GENERATE]) for _ in range(8)))
        assert teacher_runs(rt.service.metrics) == 1
        keys = {a.record.key for [a] in answers}
        assert len(keys) == 1
        assert sum(not a.cached for [a] in answers) == 1
        for [a] in answers:
            np.testing.assert_array_equal(
                a.record.topk_logprobs, answers[0][0].record.topk_logprobs
            )

    with_runtime(settings, scenario)


def store_job_rows(settings: TeacherSettings, dataset: str, queries: list[Query]) -> list[bool]:
    """Answer ``queries`` into ``dataset`` as a job does; whether each came from the cache."""

    async def scenario(rt: Runtime) -> list[bool]:
        rt.store.open_dataset(dataset, queries[0].k, Sampling())
        answers = await rt.service.answer(queries, dataset=dataset, queue=False)
        return [a.cached for a in answers]

    return with_runtime(settings, scenario)


def test_the_same_folder_by_relative_and_absolute_path_is_one_teacher(
    settings, teacher_model, monkeypatch
):
    monkeypatch.chdir(teacher_model.parent)
    relative = settings.model_copy(update={"model": f"./{teacher_model.name}"})
    assert store_job_rows(settings, "by-absolute", [BASE_SCORE]) == [False]
    assert store_job_rows(relative, "by-relative", [BASE_SCORE]) == [True]
    # ... and appending to a dataset through the other path is no "other teacher".
    assert store_job_rows(relative, "by-absolute", [BASE_SCORE]) == [True]


def test_other_weights_of_the_same_shapes_are_another_teacher(settings, teacher_model, tmp_path):
    tuned = tmp_path / "tuned"
    shutil.copytree(teacher_model, tuned)
    weights = load_file(tuned / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3 * torch.ones_like(weights[name])
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    assert (tuned / "model.safetensors").stat().st_size == (
        teacher_model / "model.safetensors"
    ).stat().st_size
    assert model_revision(tuned) != model_revision(teacher_model)
    assert store_job_rows(settings, "base", [BASE_SCORE]) == [False]
    other = settings.model_copy(update={"model": str(tuned)})
    assert store_job_rows(other, "tuned", [BASE_SCORE]) == [False]


def test_a_dataset_is_filled_only_from_rows_at_least_as_exact_as_its_codec(settings):
    coarse = settings.model_copy(update={"logprob_codec": "cbrt-u8"})
    exact = settings.model_copy(update={"logprob_codec": "float32"})
    assert store_job_rows(coarse, "coarse", [BASE_SCORE]) == [False]
    assert store_job_rows(exact, "exact", [BASE_SCORE]) == [False], (
        "a float32 dataset was filled from one-byte codes"
    )
    rows = list(ShardDataset(settings.data_root / "exact").iter_records())
    assert len(np.unique(rows[0].topk_logprobs)) == rows[0].topk_logprobs.size
    # The other way round is fine: exact rows answer a coarser dataset.
    assert store_job_rows(coarse, "coarse-again", [BASE_SCORE]) == [True]


def test_another_dtype_is_another_teacher_and_never_shares_a_dataset(settings):
    bf16 = settings.model_copy(update={"dtype": "bfloat16"})
    assert store_job_rows(settings, "fp32", [BASE_SCORE]) == [False]
    assert store_job_rows(bf16, "bf16", [BASE_SCORE]) == [False]
    assert ShardDataset(settings.data_root / "bf16").info.dtype == "bfloat16"
    assert ShardDataset(settings.data_root / "fp32").info.dtype == "float32"
    with pytest.raises(DatasetError):
        store_job_rows(bf16, "fp32", [BASE_GENERATE])


def test_the_reference_backend_stores_float64_exact_log_probs_and_tails(settings):
    """float32 log-softmax is off by a few ulps (5e-6 nats on a 49k vocabulary) and loses
    tails below 1e-4; the stored values must be the float64 log-softmax of the same
    logits, rounded once to float32, and the tail computed from the float64 values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillcache.services.teacher.cpu_attention import CPU_GQA_ATTENTION

    query = Query("score", PROMPT, 64, completion_ids=COMPLETION)

    async def scenario(rt: Runtime) -> Any:
        [answer] = await rt.service.answer([query], cache="bypass")
        return answer.record

    record = with_runtime(settings, scenario)
    # The backend's forward pass, repeated: same attention, same positions kept.
    model = AutoModelForCausalLM.from_pretrained(
        settings.model, dtype=torch.float32, attn_implementation=CPU_GQA_ATTENTION
    )
    vocab = len(AutoTokenizer.from_pretrained(settings.model))
    ids = torch.tensor([PROMPT + COMPLETION])
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            logits_to_keep=len(COMPLETION) + 1,
            use_cache=False,
        ).logits[0, :-1, :vocab]
    exact = torch.log_softmax(logits.double(), -1)
    order = torch.as_tensor(record.topk_ids, dtype=torch.long)
    top = exact.gather(1, order)
    np.testing.assert_array_equal(record.topk_logprobs, top.float().numpy())
    single = torch.log_softmax(logits.float(), -1).gather(1, order)
    assert (single.numpy() != record.topk_logprobs).any(), "float32 would pass: no test"
    tail = torch.log(-torch.expm1(torch.logsumexp(top, -1)))
    np.testing.assert_array_equal(record.tail_logprob, tail.float().numpy())


def test_a_damaged_live_dataset_costs_storing_not_the_answer(settings):
    """A torn manifest under the live dataset: the teacher's answers are still returned
    (unstored, counted), not discarded with a 500."""
    from distillcache.shared.manifest import MANIFEST

    async def scenario(rt: Runtime) -> None:
        live = rt.store.data_root / rt.store.identity.live_dataset(BASE_SCORE.k)
        live.mkdir(parents=True)
        (live / MANIFEST).write_text('{"torn": ')
        [answer] = await rt.service.answer([BASE_SCORE])
        assert answer.dataset is None and not answer.cached
        assert answer.record.topk_ids.shape == (len(COMPLETION), BASE_SCORE.k)
        failures = metric_value(
            rt.service.metrics.exposition().decode(), "distill_store_failures_total"
        )
        assert failures == 1

    with_runtime(settings, scenario)


def test_a_damaged_shard_is_quarantined_and_its_rows_recomputed_into_the_same_dataset(
    settings,
):
    """A shard whose bytes changed on disk is never served: its rows are recomputed (the
    teacher runs), stored again in the same dataset, and counted once."""
    from distillcache.shared.manifest import quarantined_path, read_manifest
    from distillcache.shared.reader import verify_dataset

    queries = [Query("score", PROMPT, 4, completion_ids=(30 + i, 31, 32, 33)) for i in range(6)]
    assert store_job_rows(settings, "ds", queries) == [False] * 6
    dataset = settings.data_root / "ds"
    [shard] = read_manifest(dataset).shards
    path = dataset / shard.file
    # One bit inside the compressed data of the largest column chunk (behind its page
    # header): the page checksum must catch it.
    group = pq.ParquetFile(path).metadata.row_group(0)
    chunk = max(
        (group.column(i) for i in range(group.num_columns)),
        key=lambda c: c.total_compressed_size,
    )
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size * 3 // 4] ^= 0x01
    path.write_bytes(bytes(data))

    assert store_job_rows(settings, "ds", queries) == [False] * 6, "a damaged row was served"
    assert quarantined_path(dataset, shard.file).exists()
    assert shard.file not in {s.file for s in read_manifest(dataset).shards}
    keys = [r.key for r in ShardDataset(dataset).iter_records(verify=True)]
    assert len(keys) == len(set(keys)) == 6
    assert verify_dataset(dataset) == ([], [])
    assert store_job_rows(settings, "ds", queries) == [True] * 6


def test_a_torn_manifest_beside_good_shards_is_rebuilt_from_them(settings):
    """The shards carry their dataset's info: a manifest cut mid-write is rebuilt from
    them when the dataset is next opened, and every row is served again."""
    from distillcache.shared.manifest import find_manifest, read_manifest
    from distillcache.shared.reader import verify_dataset

    queries = [Query("score", PROMPT, 4, completion_ids=(40 + i, 31, 32, 33)) for i in range(4)]
    assert store_job_rows(settings, "ds", queries) == [False] * 4
    dataset = settings.data_root / "ds"
    before = read_manifest(dataset)
    manifest = find_manifest(dataset)
    manifest.write_text(manifest.read_text()[: len(manifest.read_text()) // 2])

    assert store_job_rows(settings, "ds", queries) == [True] * 4
    after = read_manifest(dataset)
    assert [(s.file, s.rows, s.tokens, s.sha256) for s in after.shards] == [
        (s.file, s.rows, s.tokens, s.sha256) for s in before.shards
    ]
    assert verify_dataset(dataset) == ([], [])
