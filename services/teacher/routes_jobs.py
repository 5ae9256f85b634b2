"""``/v1/jobs``: batch jobs over an input file under the data root, with progress,
cancel and resume (job_runner.py runs them)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, HTTPException, status

from distillcache.shared.inputs import SUFFIXES
from distillcache.shared.manifest import DatasetError

from .deps import Ready, State, confined, dataset_name
from .jobs import Job
from .limits import QueryError
from .protocol import JobCreate
from .runtime import Runtime

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", response_model=Job, status_code=201)
async def create_job(body: JobCreate, rt: Ready, state: State) -> Job:
    """Start a batch job over an input file; the output dataset is created if new."""
    path = confined(state.data_root, body.input, "input")
    if not _is_file(path):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"input: {body.input!r} is not a file")
    if not path.name.lower().endswith(SUFFIXES):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"input: {body.input!r} has an unknown format; accepted: {', '.join(SUFFIXES)}",
        )
    dataset_name(body.output, "output")
    spec = body.to_spec(path, state.settings.default_k)
    if spec.k > rt.service.max_k:
        raise QueryError("k", f"must be between 1 and {rt.service.max_k}, got {spec.k}")
    try:
        await asyncio.to_thread(rt.store.open_dataset, spec.output, spec.k, spec.as_sampling())
    except (DatasetError, ValueError, OSError) as e:
        raise HTTPException(status.HTTP_409_CONFLICT, f"output: {e}") from None
    job = rt.jobs.create(spec, "service")
    rt.manager.start(job.id)
    return job


@router.get("", response_model=list[Job])
async def list_jobs(rt: Ready) -> list[Job]:
    return [rt.manager.status(job) for job in rt.jobs.list()]


@router.get("/{job_id}", response_model=Job)
async def get_job(job_id: str, rt: Ready) -> Job:
    """A job's state and progress, with the first input errors by line number."""
    return _job(rt, job_id)


@router.post("/{job_id}/cancel", response_model=Job)
async def cancel_job(job_id: str, rt: Ready) -> Job:
    """Stop a job after its current step; what it computed stays stored."""
    job = _job(rt, job_id)
    if job.state in ("queued", "running"):
        rt.manager.cancel(job_id)
    return _job(rt, job_id)


@router.post("/{job_id}/resume", response_model=Job)
async def resume_job(job_id: str, rt: Ready) -> Job:
    """Run a cancelled or failed job again; rows it stored already are skipped."""
    job = _job(rt, job_id)
    if rt.manager.running(job_id):
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is running")
    if job.origin != "service":
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id} belongs to `distill cache`; rerun that command",
        )
    rt.jobs.set_state(job_id, "queued")
    rt.manager.start(job_id)
    return _job(rt, job_id)


def _is_file(path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system is no file
        return False


def _job(rt: Runtime, job_id: str) -> Job:
    job = rt.jobs.get(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job_id: no job {job_id!r}")
    return rt.manager.status(job)
