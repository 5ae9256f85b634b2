"""Batch jobs as records: what a job computes (``JobSpec``), how far it got, and the
SQLite table that keeps them.

Job state (spec, state, progress, errors) lives in ``<data_root>/.distill/jobs.sqlite``,
so a restarted server resumes the jobs it was running. How a job runs is job_runner.py.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from distillcache.shared.schema import Sampling

if TYPE_CHECKING:
    from .store import Answer

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
Origin = Literal["service", "cli"]
UNFINISHED: tuple[JobState, ...] = ("queued", "running")
# A job's status lists this many errors; the count covers them all.
ERRORS_SHOWN = 100


class JobSpec(Sampling):
    """What a job computes: its input file, output dataset, k and the sampling of the rows
    it generates. A job with the same spec computes the same rows."""

    input: str
    output: str
    k: int


class JobProgress(BaseModel):
    """Counts of the current run. Every input row ends as exactly one of present
    (already in the output), cached (copied from another dataset), teacher or failed."""

    rows_total: int | None = None
    rows_done: int = 0
    rows_present: int = 0
    rows_cached: int = 0
    rows_teacher: int = 0
    rows_failed: int = 0
    teacher_tokens: int = 0
    cached_tokens: int = 0

    def count_answers(self, answers: Iterable[Answer]) -> None:
        """Count answered rows (and their tokens) as copied from the cache or run by the
        teacher."""
        for answer in answers:
            tokens = len(answer.record.prompt_ids) + len(answer.record.completion_ids)
            if answer.cached:
                self.rows_cached += 1
                self.cached_tokens += tokens
            else:
                self.rows_teacher += 1
                self.teacher_tokens += tokens

    def add_answered(self, other: JobProgress) -> None:
        """Add another run's answered-row counts (a scale-out worker's chunk)."""
        self.rows_teacher += other.rows_teacher
        self.teacher_tokens += other.teacher_tokens
        self.rows_cached += other.rows_cached
        self.cached_tokens += other.cached_tokens


class JobRowError(BaseModel):
    line: int
    message: str


class Job(BaseModel):
    id: str
    origin: Origin
    state: JobState
    spec: JobSpec
    progress: JobProgress
    message: str | None = None
    created: float
    updated: float
    errors: list[JobRowError] = []


class JobStore:
    """Job rows in SQLite (WAL). Used from one thread: the event loop's."""

    def __init__(self, path: Path) -> None:
        """Opens (or creates) the job table. A file SQLite cannot read is moved aside
        (``jobs.sqlite.corrupt-<time>``, logged) and a new one started: job records are
        bookkeeping, the datasets hold the work, and a resubmitted job skips every row
        they hold."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open(path)
        except sqlite3.DatabaseError as e:
            self._db.close()
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            log.error("%s is unreadable (%s); moved to %s, starting a new one", path, e, aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            path.rename(aside)
            self._open(path)

    def _open(self, path: Path) -> None:
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA quick_check").fetchone()
        self._db.execute("PRAGMA journal_mode=WAL")
        # Progress is rewritten every step; a power cut may lose the last few updates,
        # which the next run recounts anyway, but never corrupts the file.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY, origin TEXT NOT NULL, state TEXT NOT NULL,
                spec TEXT NOT NULL, progress TEXT NOT NULL, message TEXT,
                created REAL NOT NULL, updated REAL NOT NULL
            );
            CREATE TABLE IF NOT EXISTS job_errors (
                job TEXT NOT NULL, line INTEGER NOT NULL, message TEXT NOT NULL,
                PRIMARY KEY (job, line)
            );
            """
        )

    def close(self) -> None:
        self._db.close()

    def create(self, spec: JobSpec, origin: Origin) -> Job:
        now = time.time()
        job = Job(
            id=uuid.uuid4().hex[:16],
            origin=origin,
            state="queued",
            spec=spec,
            progress=JobProgress(),
            created=now,
            updated=now,
        )
        self._db.execute(
            "INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?)",
            (
                job.id,
                origin,
                job.state,
                spec.model_dump_json(),
                job.progress.model_dump_json(),
                None,
                now,
                now,
            ),
        )
        return job

    def get(self, job_id: str) -> Job | None:
        row = self._db.execute(
            "SELECT id, origin, state, spec, progress, message, created, updated"
            " FROM jobs WHERE id=?",
            (job_id,),
        ).fetchone()
        if row is None:
            return None
        errors = [
            JobRowError(line=line, message=message)
            for line, message in self._db.execute(
                "SELECT line, message FROM job_errors WHERE job=? ORDER BY line LIMIT ?",
                (job_id, ERRORS_SHOWN),
            )
        ]
        return _job(row, errors)

    def list(self) -> list[Job]:
        rows = self._db.execute(
            "SELECT id, origin, state, spec, progress, message, created, updated"
            " FROM jobs ORDER BY created"
        ).fetchall()
        return [_job(row, []) for row in rows]

    def unfinished(self, origin: Origin) -> list[Job]:
        return [j for j in self.list() if j.origin == origin and j.state in UNFINISHED]

    def set_state(self, job_id: str, state: JobState, message: str | None = None) -> None:
        self._db.execute(
            "UPDATE jobs SET state=?, message=?, updated=? WHERE id=?",
            (state, message, time.time(), job_id),
        )

    def save_progress(self, job_id: str, progress: JobProgress, errors: list[JobRowError]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT OR REPLACE INTO job_errors VALUES (?,?,?)",
            [(job_id, e.line, e.message) for e in errors],
        )
        self._db.execute(
            "UPDATE jobs SET progress=?, updated=? WHERE id=?",
            (progress.model_dump_json(), time.time(), job_id),
        )
        self._db.execute("COMMIT")


def _job(row: tuple, errors: list[JobRowError]) -> Job:
    job_id, origin, state, spec, progress, message, created, updated = row
    return Job(
        id=job_id,
        origin=origin,
        state=state,
        spec=JobSpec.model_validate_json(spec),
        progress=JobProgress.model_validate(json.loads(progress)),
        message=message,
        created=created,
        updated=updated,
        errors=errors,
    )
