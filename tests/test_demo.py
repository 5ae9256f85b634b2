"""The main job, reduced: a tiny local teacher through the real service, shards and trainer."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from distillcache.demo import DemoConfig, run_demo
from distillcache.shared.reader import verify_dataset
from distillcache.shared.tiny_models import (
    build_tiny_model,
    chat_texts,
    synthetic_task_rows,
    train_tiny_model,
)

# Real tokenizers are built once into the repository's cache (as test_cross_tokenizer does).
CACHE = Path(os.environ.get("DISTILLCACHE_CACHE", Path(__file__).parents[1] / ".cache"))


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("teacher")
    build_tiny_model(out, tokenizer_dir, num_layers=2, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(out)
    train_tiny_model(out, chat_texts(synthetic_task_rows(200, seed=1), tokenizer), steps=60)
    return out


def table_row(text: str, label: str) -> list[str]:
    """The cells of the students table's row for ``label``."""
    line = next(x for x in text.splitlines() if x.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.slow
def test_demo_pipeline_caches_trains_reports_and_reuses_the_cache(tmp_path, tiny_teacher):
    cfg = DemoConfig(
        out_dir=tmp_path / "demo",
        cache_dir=CACHE,
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
        # Two seeds where the report shows a spread, one where it says it has none.
        seeds={"kd": 2, "sft": 2, "gkd": 1, "xt-kd": 1, "xt-sft": 1},
        gkd_fraction=1.0,
        gkd_max_new_tokens=8,
        cross_tokenizer="gpt2",
        # The reduced run checks the pipeline; the vLLM backend has its own tests.
        backend="transformers",
    )
    report = run_demo(cfg)

    text = report.read_text()
    for heading in ("Teacher cache", "same final answer", "bits per byte", "curves.png"):
        assert heading in text
    assert (cfg.out_dir / "curves.png").stat().st_size > 1000
    assert "**0 teacher tokens**" in text
    for dataset in ("train", "eval"):
        faults, _ = verify_dataset(cfg.out_dir / "store" / dataset)
        assert faults == []
    for kind, seeds in cfg.seeds.items():
        for seed in range(seeds):
            log = cfg.out_dir / f"run-{kind}-s{seed}" / "metrics.jsonl"
            steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
            assert max(steps) == cfg.steps

    # Two seeds: mean (lowest-highest), and the two values are each seed's own evaluation.
    kd = table_row(text, "student KD")
    assert kd[1] == "2"
    assert re.fullmatch(r"[0-9.]+ \([0-9.]+-[0-9.]+\)", kd[2])
    assert "KD against student SFT, held-out KL" in text

    # GKD: every step on-policy, so the teacher scored the student's samples, and the
    # report's count is the run's own metrics.
    metrics = (cfg.out_dir / "run-gkd-s0" / "metrics.jsonl").read_text().splitlines()
    scored = sum(json.loads(x).get("onpolicy/teacher_tokens", 0) for x in metrics)
    assert scored > 0
    gkd = table_row(text, "student GKD")
    manifest_tokens = re.search(r"rows, ([0-9,]+) scored tokens", text).group(1)
    assert gkd[-1] == f"{manifest_tokens} cached + {scored:,.0f} scored on-policy"
    assert table_row(text, "student KD")[-1] == f"{manifest_tokens} cached"
    assert "not shown beyond noise" in text  # GKD has one seed

    # Cross-tokenizer: a student on GPT-2's real tokenizer, with bits per byte, no top-1.
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(cfg.out_dir / "run-xt-kd-s0")
    assert len(student) == 50257
    for label in ("student KD, cross-tokenizer", "student SFT, cross-tokenizer"):
        row = table_row(text, label)
        assert row[3] == "n/a" and float(row[5]) > 0

    # A second run of the whole demo is answered from the cache: the teacher never runs,
    # on-policy samples included (they are seeded, so the same ones are asked again).
    again = run_demo(cfg).read_text()
    assert "| teacher tokens (prompt + completion) | 0 |" in again
    assert "GKD: 0 scored fresh this run" in again
