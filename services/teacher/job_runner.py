"""Running batch jobs: the teacher over every row of an input file into one dataset.

A job reads its file with ``shared.inputs`` (a malformed row becomes an error with its
line number, and the job goes on), renders each row with the teacher's tokenizer, keys
it, and takes one step per ``chunk_rows`` rows: rows whose key the output dataset already
holds are skipped, the rest go through ``TeacherService.answer`` (answered from the
cache where any dataset holds them, else by the teacher) into the output dataset.

Resume needs no bookkeeping of positions: the keys are the bookkeeping. A job restarted
after a crash, a SIGKILL or a cancel reads the file again and skips every row whose key
was published, so each input row ends up in the dataset exactly once, and the teacher
reruns only what was pending when the process died. Two rows with the same content have
the same key and are stored once (the second counts as present).

The ``distill cache`` command runs the same ``execute_job`` in-process (origin "cli");
the service's ``JobManager`` runs its jobs as tasks and resumes only its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

from distillcache.shared.inputs import (
    InputError,
    InputRow,
    iter_input_rows,
    render_completion,
    render_prompt,
)

from .backend import Query
from .jobs import Job, JobProgress, JobRowError, JobSpec, JobStore
from .limits import Limits, QueryError
from .service import TeacherService

log = logging.getLogger(__name__)


async def execute_job(
    service: TeacherService,
    jobs: JobStore,
    job_id: str,
    *,
    chunk_rows: int,
    cancel: asyncio.Event | None = None,
    on_progress: Callable[[Job], None] | None = None,
) -> Job:
    """Run (or resume) job ``job_id`` to its end; returns its final state.

    Ends "done", "cancelled" (``cancel`` was set; what was computed is published) or
    "failed" (an error that is not one row's, such as an unreadable file or an output
    dataset made by another teacher). A task cancelled from outside (server shutdown)
    leaves the job "running", so the next server resumes it.
    """
    job = jobs.get(job_id)
    if job is None:
        raise KeyError(job_id)
    spec, store = job.spec, service.store
    jobs.set_state(job_id, "running")
    progress = JobProgress()
    try:
        await asyncio.to_thread(store.open_dataset, spec.output, spec.k, spec.as_sampling())
        if job.origin == "service":
            _confine(spec.input, store.data_root)
        progress.rows_total = await asyncio.to_thread(count_rows, spec.input)
        jobs.save_progress(job_id, progress, [])
        rows = iter_input_rows(spec.input)
        while cancel is None or not cancel.is_set():
            chunk = await asyncio.to_thread(lambda: list(islice(rows, chunk_rows)))
            if not chunk:
                break
            errors = await _run_step(service, spec, chunk, progress)
            await asyncio.to_thread(store.flush_due)
            jobs.save_progress(job_id, progress, errors)
            if on_progress is not None:
                on_progress(jobs.get(job_id))
        await asyncio.to_thread(store.flush, spec.output)
    except Exception as e:
        await asyncio.to_thread(_flush_quietly, service, spec.output)
        jobs.save_progress(job_id, progress, [])
        jobs.set_state(job_id, "failed", f"{type(e).__name__}: {e}")
        return jobs.get(job_id)
    cancelled = cancel is not None and cancel.is_set()
    jobs.set_state(job_id, "cancelled" if cancelled else "done")
    return jobs.get(job_id)


async def _run_step(
    service: TeacherService,
    spec: JobSpec,
    chunk: list[InputRow | InputError],
    progress: JobProgress,
) -> list[JobRowError]:
    """One chunk of rows: render, skip what the output holds, answer the rest, count."""
    queries, rows, errors = await asyncio.to_thread(
        prepare_rows, service.backend.tokenizer, service.limits, spec, chunk
    )
    keys = [service.key(q) for q in queries]
    present = await asyncio.to_thread(service.store.contains, spec.output, keys)
    todo: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key not in present and key not in todo:
            todo[key] = i
    picked = list(todo.values())
    answers = []
    if picked:
        answers = await service.answer(
            [queries[i] for i in picked],
            dataset=spec.output,
            metas=[rows[i].meta for i in picked],
            queue=False,
        )
    progress.count_answers(answers)
    progress.rows_present += len(queries) - len(picked)
    progress.rows_failed += len(errors)
    progress.rows_done += len(chunk)
    return errors


def prepare_rows(
    tokenizer: Any, limits: Limits, spec: JobSpec, chunk: list[InputRow | InputError]
) -> tuple[list[Query], list[InputRow], list[JobRowError]]:
    """Rows -> queries checked against the teacher's ``limits``; bad rows -> errors. A
    job runs it off the event loop; the scale-out planner (scaleout.py) runs it too, with
    its workers' tokenizer, so a row becomes the same query on either path."""
    errors: list[JobRowError] = []
    queries: list[Query] = []
    rows: list[InputRow] = []
    for item in chunk:
        if isinstance(item, InputError):
            errors.append(JobRowError(line=item.line, message=item.message))
            continue
        try:
            query = _query(tokenizer, spec, item)
            limits.check(query)
        except (QueryError, ValueError) as e:
            errors.append(JobRowError(line=item.line, message=str(e)))
            continue
        queries.append(query)
        rows.append(item)
    return queries, rows, errors


def _query(tokenizer: Any, spec: JobSpec, row: InputRow) -> Query:
    prompt = tuple(render_prompt(tokenizer, row.messages))
    if row.completion is None:
        return Query("generate", prompt, spec.k, sampling=spec.as_sampling())
    completion = tuple(render_completion(tokenizer, row.completion))
    return Query("score", prompt, spec.k, completion_ids=completion)


def _confine(path: str, data_root: Path) -> None:
    """A service job's input, resolved again at every run: a file swapped for a symlink
    out of the data root after the job was created is not read."""
    if not Path(path).resolve().is_relative_to(data_root):
        raise PermissionError(f"input {path} now leads outside the data root")


def count_rows(path: str) -> int:
    return sum(1 for _ in iter_input_rows(path))


def _flush_quietly(service: TeacherService, dataset: str) -> None:
    """Publish what a failing job computed, unless the dataset itself is what failed."""
    try:
        service.store.flush(dataset)
    except Exception:  # noqa: BLE001 - the job's own error is the one to report
        pass


class JobManager:
    """The service's running jobs: one task each, cancel events, resume at startup."""

    def __init__(self, service: TeacherService, jobs: JobStore, *, chunk_rows: int) -> None:
        self.service = service
        self.jobs = jobs
        self.chunk_rows = chunk_rows
        self._running: dict[str, tuple[asyncio.Task, asyncio.Event]] = {}
        # Jobs that ended with an error their own state could not record (a full disk
        # under jobs.sqlite): reported as failed by this process; the file still says
        # "running", so the next server resumes them.
        self.unrecorded: dict[str, str] = {}

    def start(self, job_id: str) -> None:
        cancel = asyncio.Event()
        task = asyncio.create_task(
            execute_job(self.service, self.jobs, job_id, chunk_rows=self.chunk_rows, cancel=cancel),
            name=f"distill-job-{job_id}",
        )
        self._running[job_id] = (task, cancel)
        self.unrecorded.pop(job_id, None)
        task.add_done_callback(lambda done: self._ended(job_id, done))

    def _ended(self, job_id: str, task: asyncio.Task) -> None:
        self._running.pop(job_id, None)
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("job %s stopped; its state could not be recorded: %r", job_id, error)
        self.unrecorded[job_id] = f"{type(error).__name__}: {error}"

    def status(self, job: Job) -> Job:
        """``job`` as this process knows it: failed when its end could not be recorded."""
        if job.id in self.unrecorded:
            message = f"failed; could not record it: {self.unrecorded[job.id]}"
            return job.model_copy(update={"state": "failed", "message": message})
        return job

    def resume_unfinished(self) -> list[str]:
        resumed = [job.id for job in self.jobs.unfinished("service")]
        for job_id in resumed:
            self.start(job_id)
        return resumed

    def running(self, job_id: str) -> bool:
        return job_id in self._running

    def cancel(self, job_id: str) -> None:
        """Stop a job after its current step; a job not running is marked cancelled."""
        if job_id in self._running:
            self._running[job_id][1].set()
        else:
            self.jobs.set_state(job_id, "cancelled")

    async def stop(self) -> None:
        """Stop every job task, leaving them "running" so the next start resumes them."""
        tasks = [task for task, _ in self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
