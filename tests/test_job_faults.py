"""Jobs when their own bookkeeping fails: a job table that cannot be written or read."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from service_support import question_rows, write_jsonl

from distillcache.services.teacher.job_runner import JobManager
from distillcache.services.teacher.jobs import JobSpec, JobStore
from distillcache.services.teacher.metrics import ServiceMetrics
from distillcache.services.teacher.runtime import build_runtime, open_backend
from distillcache.services.teacher.settings import TeacherSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_an_unreadable_job_table_is_moved_aside_and_a_new_one_started(tmp_path: Path):
    path = tmp_path / "jobs.sqlite"
    path.write_bytes(b"this is not an SQLite file " * 200)
    jobs = JobStore(path)
    job = jobs.create(JobSpec(input="in.jsonl", output="ds", k=4), "service")
    assert jobs.get(job.id).state == "queued"
    jobs.close()
    [aside] = tmp_path.glob("jobs.sqlite.corrupt-*")
    assert aside.read_bytes().startswith(b"this is not an SQLite file")


class FullDiskJobStore(JobStore):
    """A job table on a disk that fills up: every progress write fails, as SQLite does."""

    def save_progress(self, *args, **kwargs) -> None:
        raise sqlite3.OperationalError("database or disk is full")


def test_a_job_whose_state_cannot_be_written_stops_and_shows_failed(
    tmp_path: Path, teacher_model: Path
):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "rows.jsonl", question_rows(3))
    settings = TeacherSettings(model=str(teacher_model), data_root=data)

    async def run() -> tuple[str, str]:
        runtime = await build_runtime(settings, await open_backend(settings), ServiceMetrics())
        jobs = FullDiskJobStore(data / ".distill" / "faulty.sqlite")
        manager = JobManager(runtime.service, jobs, chunk_rows=2)
        try:
            job = jobs.create(
                JobSpec(input=str(data / "rows.jsonl"), output="ds", k=4, max_tokens=2),
                "service",
            )
            manager.start(job.id)
            while manager.running(job.id):
                await asyncio.sleep(0.05)
            return manager.status(jobs.get(job.id)).state, jobs.get(job.id).state
        finally:
            jobs.close()
            await runtime.close()

    shown, recorded = asyncio.run(run())
    assert shown == "failed"
    assert recorded == "running"  # so the next server start resumes it
