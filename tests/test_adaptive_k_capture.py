"""Adaptive k end to end: captured by `distill cache` and over HTTP, trained from.

The capture side takes the rule as settings (``--adaptive-mass``, ``--adaptive-min-prob``,
``--adaptive-min-k``; ``DISTILL_ADAPTIVE_*``), records it in the dataset, and answers
from the cache only with rows that kept what the rule keeps. Every check below is
against the full top-k the same teacher stores without the rule, cut by the rule in
float64 (tests/test_adaptive_k_cache.py's reference), or against the rule's definition.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pyarrow as pa
import pytest
from service_support import DISTILL, question_rows, wait_job, write_jsonl
from test_adaptive_k_cache import assert_answers_as
from typer.testing import CliRunner

from distillcache.cli import app
from distillcache.shared.reader import PAD_ID, ShardDataset, decode_table
from distillcache.shared.schema import PARQUET_METADATA_KEY, AdaptiveK, DatasetInfo
from distillcache.shared.tiny_models import build_tiny_model

K = 8
# The tiny teacher is nearly uniform over its 400 tokens (top-8 probabilities 0.0038 to
# 0.0098): a threshold inside that range keeps 2 to 8 entries.
RULE = AdaptiveK(min_prob=0.0042, min_k=2)
ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
SERVER_SETTINGS = {
    "default_k": K,
    "logprob_codec": "float32",
    "adaptive_min_prob": RULE.min_prob,
    "adaptive_min_k": RULE.min_k,
    "flush_rows": 1,  # every answer published at once, to read back
}
ADAPTIVE_FLAGS = ["--adaptive-min-prob", str(RULE.min_prob), "--adaptive-min-k", str(RULE.min_k)]


def cache(rows, out, teacher, *flags):
    """`distill cache` (the real entry point): (rows by the teacher, rows from the cache)."""
    result = subprocess.run(
        [DISTILL, "cache", str(rows), "--teacher", str(teacher), "--out", str(out), "--k",
         str(K), "--max-tokens", "6", "--logprob-codec", "float32", *flags],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    done = re.search(r"(\d+) by the teacher .* (\d+) from the cache", result.stderr)
    return int(done.group(1)), int(done.group(2))


def records(root):
    return {r.key: r for r in ShardDataset(root).iter_records()}


@pytest.fixture(scope="module")
def captured(tmp_path_factory, teacher_model):
    """Two data roots: in ``a`` the full top-k first, then the adaptive dataset; in ``b``
    the adaptive dataset first, then the full top-k."""
    root = tmp_path_factory.mktemp("adaptive")
    rows = write_jsonl(root / "rows.jsonl", question_rows(8))
    runs = {
        "a/full": cache(rows, root / "a" / "full", teacher_model),
        "a/cut": cache(rows, root / "a" / "cut", teacher_model, *ADAPTIVE_FLAGS),
        "b/cut": cache(rows, root / "b" / "cut", teacher_model, *ADAPTIVE_FLAGS),
        "b/full": cache(rows, root / "b" / "full", teacher_model),
    }
    return root, runs


def test_distill_cache_records_the_rule_and_keeps_what_it_says(captured):
    root, runs = captured
    info = ShardDataset(root / "a" / "cut").info
    assert info.adaptive == RULE and info.k == K
    full, cut = records(root / "a" / "full"), records(root / "a" / "cut")
    assert set(full) == set(cut) and len(full) == 8
    counts = set()
    for key, row in cut.items():
        assert_answers_as(row, full[key], RULE)
        counts |= set((row.topk_ids != PAD_ID).sum(axis=1).tolist())
    assert len(counts) > 1 and max(counts) < K, f"the rule should vary k: {counts}"


def test_a_full_top_k_answers_the_adaptive_run_and_a_cut_one_never_answers_a_full_run(
    captured,
):
    _, runs = captured
    assert runs["a/full"] == (8, 0)
    assert runs["a/cut"] == (0, 8), "the full top-k rows should have answered the rule"
    assert runs["b/cut"] == (8, 0)
    assert runs["b/full"] == (8, 0), "cut rows answered a request for the full top-k"


def test_a_rerun_with_another_rule_is_refused_naming_it(captured, teacher_model):
    root, _ = captured
    result = subprocess.run(
        [DISTILL, "cache", str(root / "rows.jsonl"), "--teacher", str(teacher_model), "--out",
         str(root / "a" / "cut"), "--k", str(K), "--max-tokens", "6", "--logprob-codec",
         "float32", "--adaptive-mass", "0.7"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "adaptive k" in result.stderr and "use a new --out" in result.stderr


def test_adaptive_min_k_alone_is_a_usage_error_naming_the_flag(tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", question_rows(1))
    result = CliRunner().invoke(
        app,
        ["cache", str(rows), "--teacher", "t", "--out", str(tmp_path / "d"),
         "--adaptive-min-k", "3"],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exit_code == 2
    assert "adaptive_min_k needs adaptive_mass or adaptive_min_prob" in result.output


@pytest.mark.usefixtures("one_torch_thread")
def test_the_trainer_learns_from_an_adaptive_dataset(captured, tokenizer_dir, tmp_path):
    root, _ = captured
    student = build_tiny_model(tmp_path / "student", tokenizer_dir, hidden_size=64, seed=4)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "--data", str(root / "a" / "cut"), "--eval-data", str(root / "a" / "cut"),
         "--student", str(student), "--output-dir", str(out), "--max-steps", "12",
         "--batch-size", "4", "--lr", "3e-3", "--eval-every", "1", "--temperature", "2",
         "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kl = [line["eval/kl"] for line in lines if "eval/kl" in line]
    kd = [line["train/kd"] for line in lines if "train/kd" in line]
    assert all(np.isfinite(kd)) and all(v > 0 for v in kd)
    assert len(kl) == 12 and kl[-1] < 0.8 * kl[0], kl
    assert (out / "model.safetensors").exists()


def test_http_answers_are_cut_as_stored_fresh_or_cached(client, server):
    body = {"prompt": "What is 2 + 3?", "max_tokens": 6, "k": K}
    fresh = client.post("/v1/generate", json=body).json()
    again = client.post("/v1/generate", json=body).json()
    assert not fresh["cached"] and again["cached"]
    assert again["topk_ids"] == fresh["topk_ids"]
    assert again["topk_logprobs"] == fresh["topk_logprobs"]
    # The row as stored, in the live dataset of the rule: the answer is what it holds.
    stored = records(server.data / fresh["dataset"])[fresh["key"]]
    info = ShardDataset(server.data / fresh["dataset"]).info
    assert info.adaptive == RULE
    lengths = {len(ids) for ids in fresh["topk_ids"]}
    assert min(lengths) >= RULE.min_k and max(lengths) <= K
    for j, (ids, lps) in enumerate(zip(fresh["topk_ids"], fresh["topk_logprobs"], strict=True)):
        real = stored.topk_ids[j] != PAD_ID
        assert sorted(ids) == sorted(stored.topk_ids[j][real].tolist())
        # Beyond min_k, only entries at least min_prob likely are kept.
        assert len(ids) == RULE.min_k or np.exp(lps[-1]) >= RULE.min_prob
        kept = float(np.exp(lps).sum())
        assert fresh["tail_logprob"][j] == pytest.approx(np.log1p(-kept), abs=1e-5)


def test_http_arrow_answers_decode_as_a_shard_of_the_rule(client):
    body = {"pairs": [{"prompt": "What is 4 + 4?", "completion": "8"}], "k": K}
    response = client.post(
        "/v1/score", json=body, headers={"Accept": "application/vnd.apache.arrow.stream"}
    )
    assert response.status_code == 200
    table = pa.ipc.open_stream(response.content).read_all()
    info = DatasetInfo.model_validate_json(table.schema.metadata[PARQUET_METADATA_KEY])
    assert info.adaptive == RULE
    batch = decode_table(table, info)
    as_json = client.post("/v1/score", json=body).json()["results"][0]
    assert [sorted(ids[ids != PAD_ID].tolist()) for ids in batch.topk_ids] == [
        sorted(ids) for ids in as_json["topk_ids"]
    ]


def test_an_http_job_writes_an_adaptive_dataset(client, server):
    write_jsonl(server.data / "job-rows.jsonl", question_rows(3, start=20))
    job = client.post(
        "/v1/jobs", json={"input": "job-rows.jsonl", "output": "job-cut", "max_tokens": 4}
    ).json()
    assert wait_job(client, job["id"])["state"] == "done"
    info = ShardDataset(server.data / "job-cut").info
    assert info.adaptive == RULE and info.k == K
    for row in records(server.data / "job-cut").values():
        kept = (row.topk_ids != PAD_ID).sum(axis=1)
        assert (kept >= RULE.min_k).all() and (kept <= K).all()
        smallest = np.where(row.topk_ids != PAD_ID, row.topk_logprobs, np.inf).min(axis=1)
        assert ((np.exp(smallest) >= RULE.min_prob) | (kept == RULE.min_k)).all()


def test_the_on_policy_client_reads_an_adaptive_teachers_scores_padded(client, server):
    from distillcache.trainer.teacher_client import TeacherClient

    prompt = client.post(
        "/v1/generate", json={"prompt": "What is 6 + 1?", "max_tokens": 5, "k": K}
    ).json()
    pair = {
        "prompt_ids": prompt["prompt_ids"],
        "completion_ids": prompt["completion_ids"],
        "score_ids": [[3, 4]] * len(prompt["completion_ids"]),
    }
    teacher = TeacherClient(server.url)
    try:
        [seq], _ = teacher.score([pair], k=K, dataset=None)
    finally:
        teacher.close()
    as_json = client.post("/v1/score", json={"pairs": [pair], "k": K}).json()["results"][0]
    assert seq.topk_ids.shape == (len(pair["completion_ids"]), K)
    for ids, lps, want_ids, want_lps in zip(
        seq.topk_ids, seq.topk_logprobs, as_json["topk_ids"], as_json["topk_logprobs"],
        strict=True,
    ):  # fmt: skip
        real = ids != PAD_ID
        assert real.sum() == len(want_ids)
        assert np.isneginf(lps[~real]).all()
        assert dict(zip(ids[real].tolist(), lps[real].tolist(), strict=True)) == pytest.approx(
            dict(zip(want_ids, want_lps, strict=True))
        )
    assert seq.score_logprobs.shape == (len(pair["completion_ids"]), 2)


def test_the_vllm_drop_in_lists_each_positions_kept_entries(client):
    """/v1/completions with prompt_logprobs: per position, the entries the rule kept (by
    rank, as /v1/score lists them), plus the actual token when it was dropped."""
    ids = client.post(
        "/v1/generate", json={"prompt": "What is 9 + 9?", "max_tokens": 4, "k": K}
    ).json()
    seq = ids["prompt_ids"] + ids["completion_ids"]
    body = {"prompt": seq, "echo": True, "max_tokens": 0, "prompt_logprobs": K}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    positions = response.json()["choices"][0]["prompt_logprobs"][1:]
    pair = {"prompt_ids": seq[:1], "completion_ids": seq[1:]}
    ref = client.post("/v1/score", json={"pairs": [pair], "k": K}).json()["results"][0]
    assert len(positions) == len(ref["topk_ids"])
    assert len({len(kept) for kept in ref["topk_ids"]}) > 1, "positions should keep various k"
    for j, position in enumerate(positions):
        ranked = sorted(position.items(), key=lambda item: item[1]["rank"])
        kept = ref["topk_ids"][j]
        assert [int(t) for t, _ in ranked[: len(kept)]] == kept
        extra = [int(t) for t, _ in ranked[len(kept) :]]
        assert extra in ([], [seq[j + 1]]) and PAD_ID not in extra
