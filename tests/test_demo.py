"""The main job, reduced: a tiny local teacher through the real service, shards and trainer."""

from __future__ import annotations

import json

import pytest

from distillcache.demo import DemoConfig, run_demo
from distillcache.shared.reader import verify_dataset
from distillcache.shared.tiny_models import (
    build_tiny_model,
    chat_texts,
    synthetic_task_rows,
    train_tiny_model,
)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("teacher")
    build_tiny_model(out, tokenizer_dir, num_layers=2, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(out)
    train_tiny_model(out, chat_texts(synthetic_task_rows(200, seed=1), tokenizer), steps=60)
    return out


@pytest.mark.slow
def test_demo_pipeline_caches_trains_reports_and_reuses_the_cache(tmp_path, tiny_teacher):
    cfg = DemoConfig(
        out_dir=tmp_path / "demo",
        cache_dir=tmp_path / "cache",
        teacher=str(tiny_teacher),
        questions="synthetic",
        n_train=24,
        n_eval=8,
        k=8,
        max_tokens=24,
        student_every=2,
        steps=4,
        batch_size=4,
        max_length=128,
        # The reduced run checks the pipeline; the vLLM backend has its own tests.
        backend="transformers",
    )
    report = run_demo(cfg)

    text = report.read_text()
    for heading in (
        "Teacher cache",
        "student KD",
        "student SFT",
        "same final answer",
        "curves.png",
    ):
        assert heading in text
    assert (cfg.out_dir / "curves.png").stat().st_size > 1000
    assert "**0 teacher tokens**" in text
    for dataset in ("train", "eval"):
        faults, _ = verify_dataset(cfg.out_dir / "store" / dataset)
        assert faults == []
    kd_log = cfg.out_dir / "run-kd" / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in kd_log.read_text().splitlines()]
    assert max(steps) == cfg.steps

    # A second run of the whole demo is answered from the cache: the teacher never runs.
    report_again = run_demo(cfg)
    assert "| teacher tokens (prompt + completion) | 0 |" in report_again.read_text()
