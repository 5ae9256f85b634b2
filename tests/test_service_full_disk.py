"""A data root on a disk that really fills up, during a batch job and live requests.

The data root (datasets and the service's SQLite state) lives on a small tmpfs. The disk
is filled while a job runs and clients ask for answers, then space is freed. Afterwards:
the job is not stuck (it ends, and a resume finishes it), every input row is stored
exactly once, every answer a client was told is stored is there, and `distill verify`
passes on every dataset. Skipped where a tmpfs cannot be mounted (not root).
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import httpx
import pytest
from service_support import (
    DISTILL,
    fill_disk,
    metric,
    question_rows,
    thread_server,
    wait_job,
    write_jsonl,
)

from distillcache.services.teacher.settings import TeacherSettings
from distillcache.shared.reader import ShardDataset

ROWS = 24


@pytest.mark.slow
def test_a_full_disk_during_a_job_and_live_requests_loses_and_doubles_nothing(
    tmpfs, teacher_model: Path
):
    small_disk = tmpfs("4m")
    data = small_disk / "data"
    data.mkdir()
    rows = question_rows(ROWS)
    write_jsonl(data / "rows.jsonl", rows)
    settings = TeacherSettings(
        model=str(teacher_model),
        data_root=data,
        default_k=4,
        flush_rows=4,
        flush_seconds=0.5,
        job_chunk_rows=4,
        row_group_tokens=64,
    )
    stored_answers: list[tuple[str, str]] = []
    statuses: list[int] = []
    with thread_server(settings) as url, httpx.Client(base_url=url, timeout=120) as client:
        filler = fill_disk(small_disk, leave=16 << 10)
        job = client.post(
            "/v1/jobs", json={"input": "rows.jsonl", "output": "ds", "max_tokens": 6}
        ).json()

        def live(i: int) -> None:
            r = client.post("/v1/generate", json={"prompt": f"live {i}", "max_tokens": 4})
            statuses.append(r.status_code)
            if r.status_code == 200 and r.json()["dataset"] is not None:
                stored_answers.append((r.json()["dataset"], r.json()["key"]))

        clients = [threading.Thread(target=live, args=(i,)) for i in range(8)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        first = wait_job(client, job["id"])
        unstored = metric(client, "distill_store_failures_total")
        print(f"job {first['state']} ({first['message']}); live {statuses}; unstored {unstored}")
        assert first["state"] != "done" or unstored > 0, "the disk never filled up"
        assert set(statuses) <= {200}, statuses  # a full disk costs storing, not answers
        filler.unlink()  # space again

        if first["state"] != "done":
            resumed = client.post(f"/v1/jobs/{job['id']}/resume")
            assert resumed.status_code == 200, resumed.text
            final = wait_job(client, job["id"])
        else:
            final = first
        assert final["state"] == "done", final
        # Publish what is pending, then check what the server says it stored.
        client.post("/v1/generate", json={"prompt": "flush", "max_tokens": 1})

    stored = {row.key: row for row in ShardDataset(data / "ds").iter_records(verify=True)}
    keys = [row.key for row in ShardDataset(data / "ds").iter_records()]
    assert len(keys) == len(set(keys)) == ROWS
    assert sorted(row.meta["id"] for row in stored.values()) == sorted(r["id"] for r in rows)
    for dataset, key in stored_answers:
        assert key in {row.key for row in ShardDataset(data / dataset).iter_records()}
    for dataset in sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")):
        result = subprocess.run([DISTILL, "verify", str(dataset)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
