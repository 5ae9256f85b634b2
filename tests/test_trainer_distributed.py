"""Two processes under torchrun (gloo, CPU), launched as a user would: ``distill train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from service_support import thread_server
from trainer_support import max_weight_difference, task_tokenizer, tiny_model
from trainer_support import write_teacher_shards as make_shards
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillcache.services.teacher.settings import TeacherSettings
from distillcache.shared.reader import ShardDataset
from distillcache.shared.tiny_models import chat_texts, synthetic_task_rows, train_tiny_model

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
    return {"tokenizer": tokenizer, "teacher": teacher, "shards": shards, "student": student}


def torchrun(world, out: Path, *extra: str) -> subprocess.CompletedProcess:
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
    return done


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


@pytest.fixture(scope="module")
def onpolicy_world(world, tmp_path_factory):
    """A teacher behind a real server and a student fitted to the task's chat transcripts,
    so that its samples end (eos) after different numbers of tokens on the two ranks."""
    root = tmp_path_factory.mktemp("onpolicy")
    student = tiny_model(root / "student", world["tokenizer"], hidden=64, seed=5)
    rows = list(synthetic_task_rows(64, seed=6))
    train_tiny_model(student, chat_texts(rows, AutoTokenizer.from_pretrained(student)), steps=60)
    settings = TeacherSettings(
        model=str(world["teacher"]), data_root=root / "served", default_k=8, flush_rows=1
    )
    with thread_server(settings) as url:
        yield {"student": student, "url": url, "served": root / "served"}


def onpolicy_run(world, onpolicy_world, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return torchrun(
        world, out,
        "--student", str(onpolicy_world["student"]), "--loss", "reverse_kl",
        "--on-policy-fraction", "0.75", "--teacher-url", onpolicy_world["url"],
        "--sample-max-new-tokens", "40", "--max-length", "128",
        # One sample per micro-batch: a rank stops at its own sample's length.
        "--batch-size", "1",
        *extra,
    )  # fmt: skip


def test_fsdp_samples_in_lockstep_and_ends_with_the_weights_ddp_ends_with(
    world, onpolicy_world, tmp_path
):
    """Under FSDP every rank joins each generation step (a collective) until all ranks'
    samples ended; it draws what a DDP rank draws, so both end with the same weights, and
    a stopped and resumed FSDP run ends there too."""
    done = onpolicy_run(world, onpolicy_world, tmp_path / "ddp")
    assert done.stderr.count("last training loss") == 1, "one summary, from rank 0"
    onpolicy_run(world, onpolicy_world, tmp_path / "fsdp", "--distributed", "fsdp",
                 "--stop-at-step", "2")  # fmt: skip
    onpolicy_run(world, onpolicy_world, tmp_path / "fsdp", "--distributed", "fsdp",
                 "--resume", "auto")  # fmt: skip
    assert max_weight_difference(tmp_path / "ddp", tmp_path / "fsdp") < 1e-5
    rows = {}
    for run in ("ddp", "fsdp"):
        stored = ShardDataset(onpolicy_world["served"] / f"onpolicy-{run}").iter_records()
        rows[run] = {(r.meta["step"], r.meta["rank"], r.meta["micro"], r.key) for r in stored}
    assert rows["ddp"] == rows["fsdp"]
    lengths = {}
    for record in ShardDataset(onpolicy_world["served"] / "onpolicy-ddp").iter_records():
        at = (record.meta["step"], record.meta["micro"])
        lengths.setdefault(at, {}).setdefault(record.meta["rank"], []).append(
            len(record.completion_ids)
        )
    # A rank generates until its longest sample ends: in some micro-batch the two ranks
    # stopped after different numbers of tokens, which FSDP only survives in lockstep.
    longest = [{max(v) for v in ranks.values()} for ranks in lengths.values()]
    assert any(len(ends) > 1 for ends in longest), lengths
