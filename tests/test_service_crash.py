"""Crash safety of batch jobs: real processes killed with SIGKILL midway, then restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from service_support import (
    DISTILL,
    question_rows,
    serve_process,
    wait_job,
    write_jsonl,
)

from distillcache.shared.manifest import MANIFEST
from distillcache.shared.reader import ShardDataset

ROWS = 96
# Small steps and shards, so a kill lands between published shards.
ENV = {"DISTILL_JOB_CHUNK_ROWS": "8", "DISTILL_FLUSH_ROWS": "8", "DISTILL_MAX_BATCH_SIZE": "8"}

pytestmark = pytest.mark.slow


def published_rows(dataset: Path) -> int:
    try:
        manifest = json.loads((dataset / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return sum(shard["rows"] for shard in manifest["shards"])


def kill_when_published(process: subprocess.Popen, dataset: Path, rows: int) -> int:
    """SIGKILL ``process`` once ``dataset`` has ``rows`` published rows; returns the count."""
    deadline = time.monotonic() + 300
    while published_rows(dataset) < rows:
        assert process.poll() is None, "the process ended before it could be killed midway"
        assert time.monotonic() < deadline, "no rows were published"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return published_rows(dataset)


def assert_every_row_exactly_once(dataset: Path, rows: list[dict]) -> None:
    stored = list(ShardDataset(dataset).iter_records(verify=True))
    assert len({row.key for row in stored}) == len(stored)
    assert sorted(row.meta["id"] for row in stored) == sorted(row["id"] for row in rows)
    verify = subprocess.run([DISTILL, "verify", str(dataset)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_distill_cache_killed_with_sigkill_midway_and_restarted_stores_every_row_once(
    tmp_path: Path, teacher_model: Path
):
    model = teacher_model
    rows = question_rows(ROWS)
    source = write_jsonl(tmp_path / "in.jsonl", [*rows[:3], "{broken", *rows[3:]])
    data = tmp_path / "data"
    dataset = data / "ds"
    command = [
        DISTILL,
        "cache",
        str(source),
        "--teacher",
        str(model),
        "--out",
        str(dataset),
        "--k",
        "4",
        "--max-tokens",
        "16",
        # The one malformed line is expected; any other failure must fail the command.
        "--max-failures",
        "1",
    ]
    env = {**os.environ, **ENV}

    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed_at = kill_when_published(first, dataset, 16)
    assert 16 <= killed_at < ROWS, "the kill did not land midway"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{source}:4:" in rerun.stderr and "invalid JSON" in rerun.stderr
    assert f"{killed_at} already in" in rerun.stderr
    assert_every_row_exactly_once(dataset, rows)

    # The same job into another dataset of the same data root: all from the cache.
    copy = subprocess.run(
        [*command[:6], str(data / "copy"), *command[7:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert copy.returncode == 0, copy.stdout + copy.stderr
    assert f"0 by the teacher (0 tokens), {ROWS} from the cache" in copy.stderr
    assert_every_row_exactly_once(data / "copy", rows)


def test_a_server_killed_with_sigkill_resumes_its_job_after_restart(
    tmp_path: Path, teacher_model: Path
):
    model = teacher_model
    data = tmp_path / "data"
    data.mkdir()
    rows = question_rows(ROWS)
    write_jsonl(data / "in.jsonl", rows)
    args = ["--model", str(model), "--data-root", str(data), "--default-k", "4"]
    log = tmp_path / "server.log"

    with serve_process(args, log, ENV) as (url, process):
        job = httpx.post(
            f"{url}/v1/jobs", json={"input": "in.jsonl", "output": "ds", "max_tokens": 16}
        ).json()
        killed_at = kill_when_published(process, data / "ds", 16)
    assert 16 <= killed_at < ROWS, "the kill did not land midway"

    with serve_process(args, log, ENV) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            done = wait_job(client, job["id"])
    assert done["state"] == "done", done
    assert done["progress"]["rows_present"] == killed_at
    assert done["progress"]["rows_present"] + done["progress"]["rows_teacher"] == ROWS
    assert_every_row_exactly_once(data / "ds", rows)
