"""Two processes under torchrun (gloo, CPU), launched as a user would: ``distill train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_support import max_weight_difference, task_tokenizer, tiny_model
from trainer_support import write_teacher_shards as make_shards
from transformers import AutoModelForCausalLM

from distillcache.shared.tiny_models import synthetic_task_rows

pytestmark = pytest.mark.slow

DISTILL = Path(sys.executable).with_name("distill")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    tokenizer = task_tokenizer(root / "tokenizer")
    teacher = tiny_model(root / "teacher", tokenizer, hidden=64, seed=3)
    rows = list(synthetic_task_rows(96, seed=4))
    shards = make_shards(teacher, rows, root / "shards", k=8, row_group_tokens=300)
    student = tiny_model(root / "student", tokenizer, hidden=64, seed=5)
    return {"shards": shards, "student": student}


def torchrun(world, out: Path, *extra: str) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(DISTILL), "train",
        "--data", str(world["shards"]), "--student", str(world["student"]),
        "--output-dir", str(out), "--device", "cpu",
        "--batch-size", "4", "--grad-accum", "2", "--max-steps", "4", "--lr", "3e-3",
        "--eval-fraction", "0.2", "--shuffle-window", "16", "--chunk-size", "32",
        "--record-keys", "--no-progress", "--no-tensorboard", "--log-every", "1",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def rank_state(checkpoint: Path, rank: int) -> dict:
    return torch.load(checkpoint / f"rank-{rank}.pt", weights_only=False)


@pytest.fixture(scope="module")
def ddp_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-run")
    torchrun(world, out)
    return out


def test_two_ranks_train_on_disjoint_rows_and_end_with_identical_weights(ddp_run):
    keys = [(ddp_run / f"keys-rank{r}.txt").read_text().split() for r in range(2)]
    # 4 steps x 2 micro-batches x 4 rows per rank.
    assert len(keys[0]) == len(keys[1]) == 32
    assert not set(keys[0]) & set(keys[1])
    checkpoint = ddp_run / "checkpoint-4"
    fingerprints = [rank_state(checkpoint, r)["weights_sha256"] for r in range(2)]
    assert fingerprints[0] is not None and fingerprints[0] == fingerprints[1]
    positions = [rank_state(checkpoint, r)["position"] for r in range(2)]
    assert positions[0] != positions[1] or positions[0]["rows"] > 0
    AutoModelForCausalLM.from_pretrained(ddp_run)
    records = [json.loads(line) for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/kl" in r for r in records)


def test_fsdp_run_stopped_and_resumed_ends_with_the_weights_ddp_ends_with(world, ddp_run, tmp_path):
    torchrun(world, tmp_path, "--distributed", "fsdp", "--stop-at-step", "2")
    assert not (tmp_path / "model.safetensors").exists()
    torchrun(world, tmp_path, "--distributed", "fsdp", "--resume", "auto")
    assert rank_state(tmp_path / "checkpoint-4", 1)["weights_sha256"] is None
    assert max_weight_difference(ddp_run, tmp_path) < 1e-5
    keys = [(tmp_path / f"keys-rank{r}.txt").read_text().split() for r in range(2)]
    assert keys == [(ddp_run / f"keys-rank{r}.txt").read_text().split() for r in range(2)]
