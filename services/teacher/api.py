"""The teacher's HTTP API: FastAPI app factory, request/response models, routes.

Endpoints (JSON; OpenAPI at /docs):

- ``POST /v1/generate``: a completion with top-k log-probs for a prompt (text, chat
  messages or token ids).
- ``POST /v1/score``: top-k log-probs of given (prompt, completion) pairs by teacher forcing.
- ``POST /v1/jobs``, ``GET /v1/jobs``, ``GET /v1/jobs/{id}``, ``POST /v1/jobs/{id}/cancel``,
  ``POST /v1/jobs/{id}/resume``: batch jobs over an input file under the data root.
- ``GET /v1/datasets``, ``GET /v1/datasets/{name}``: manifest summaries.
- ``/healthz`` (the process answers), ``/readyz`` (the model is loaded), ``/metrics``.

The model loads in the background after startup, so /healthz answers at once and /v1
answers 503 until /readyz does. With an auth token set, /v1 needs ``Authorization:
Bearer <token>`` (401 otherwise); probes, metrics and docs stay open for orchestrators.

Every refusal of input names the field: unknown fields and out-of-range values are 422
with FastAPI's ``detail`` list plus a ``message`` string; limits that depend on the
loaded teacher (k above its maximum, a prompt longer than its context) use the same
shape; paths outside the data root are 403, malformed paths and names 400.
Log-probs in responses pass through the store's codec, so an answer reads the same
whether it was just computed or served from the cache; -inf (no mass outside the
top-k) is sent as null, since JSON has no infinity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distillcache.shared.codec import decode_logprobs, encode_logprobs
from distillcache.shared.inputs import (
    SUFFIXES,
    InputError,
    InputRow,
    parse_row,
    render_completion,
    render_prompt,
)
from distillcache.shared.manifest import DatasetError, read_manifest
from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import DatasetInfo, SamplingInfo

from .backend import Sampling, TeacherBackend
from .engine import Engine, QueueFull
from .index import dataset_names
from .jobs import Job, JobManager, JobSpec, JobStore
from .metrics import ServiceMetrics
from .service import Answer, Query, QueryError, TeacherService
from .settings import TeacherSettings
from .store import TeacherIdentity, TeacherStore, check_dataset_name

log = logging.getLogger(__name__)

BackendLoader = Callable[[], Awaitable[TeacherBackend]]

# Seconds a client is told to wait while the model is still loading.
_LOADING_RETRY_AFTER = 5


# -- request and response models --------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class _Prompt(_Strict):
    """Exactly one of: ``prompt`` (text, one user turn), ``messages`` (a chat) or
    ``prompt_ids`` (token ids used as they are). Text and chats go through the teacher
    tokenizer's chat template, as batch job rows do."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    prompt_ids: list[int] | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> Any:
        given = [f for f in ("prompt", "messages", "prompt_ids") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of prompt, messages, prompt_ids (got {', '.join(given) or 'none'})"
            )
        return self

    def prompt_field(self) -> str:
        return next(f for f in ("prompt", "messages", "prompt_ids") if getattr(self, f) is not None)


class GenerateBody(_Prompt):
    max_tokens: int = Field(Sampling.max_tokens, ge=1)
    temperature: float = Field(Sampling.temperature, ge=0)
    top_p: float = Field(Sampling.top_p, gt=0, le=1)
    seed: int | None = None
    k: int | None = Field(None, ge=1, description="Top-k to return (default: the server's).")
    store: bool = Field(True, description="Store the answer in the cache.")


class ScorePair(_Prompt):
    """A prompt and the completion to score: ``completion`` (text; the tokenizer's eos is
    appended, as for job rows) or ``completion_ids`` (used as they are)."""

    completion: str | None = None
    completion_ids: list[int] | None = None
    logprob_start: int | None = Field(
        None, ge=1, description="First scored position (default: the first completion token)."
    )

    @model_validator(mode="after")
    def _one_completion(self) -> Any:
        if (self.completion is None) == (self.completion_ids is None):
            raise ValueError("give exactly one of completion, completion_ids")
        return self


class ScoreBody(_Strict):
    pairs: list[ScorePair] = Field(min_length=1, max_length=256)
    k: int | None = Field(None, ge=1)
    store: bool = True


class TeacherAnswer(BaseModel):
    """One sequence. Position j of the per-position arrays is the teacher's distribution
    over token ``logprob_start + j`` of ``prompt_ids + completion_ids``; its top-k are
    listed most likely first."""

    key: str
    cached: bool = Field(description="Answered from the store; the teacher did not run.")
    dataset: str | None = Field(description="Dataset holding the answer (None: not stored).")
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_text: str | None
    finish_reason: str | None
    logprob_start: int
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    token_logprob: list[float | None]
    tail_logprob: list[float | None] = Field(
        description="log of the mass outside the top-k; null when the top-k holds all of it."
    )


class ScoreResponse(BaseModel):
    results: list[TeacherAnswer]


class JobCreate(_Strict):
    input: str = Field(description="Input file (JSONL, JSONL.zst, Parquet) under the data root.")
    output: str = Field(description="Dataset name; the dataset is <data_root>/<output>.")
    k: int | None = Field(None, ge=1)
    max_tokens: int = Field(Sampling.max_tokens, ge=1)
    temperature: float = Field(Sampling.temperature, ge=0)
    top_p: float = Field(Sampling.top_p, gt=0, le=1)
    seed: int | None = None


class DatasetSummary(BaseModel):
    name: str
    rows: int = 0
    tokens: int = 0
    bytes: int = 0
    shards: int = 0
    pending_rows: int = Field(0, description="Rows stored but not yet published as a shard.")
    updated: float | None = None
    info: DatasetInfo | None = None
    error: str | None = None


# -- runtime ----------------------------------------------------------------------------


@dataclass
class _Runtime:
    backend: TeacherBackend
    store: TeacherStore
    engine: Engine
    service: TeacherService
    jobs: JobStore
    manager: JobManager


class _State:
    """What the app holds between requests: set up by the lifespan, read by the routes."""

    def __init__(self, settings: TeacherSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtime: _Runtime | None = None
        self.load_error: str | None = None


async def _start(state: _State, load_backend: BackendLoader) -> None:
    s = state.settings
    backend = None
    try:
        backend = await load_backend()
        store = await asyncio.to_thread(
            TeacherStore,
            s.data_root,
            TeacherIdentity.of(backend),
            codec=s.logprob_codec,
            flush_rows=s.flush_rows,
            flush_seconds=s.flush_seconds,
        )
    except Exception as e:
        log.exception("the teacher failed to load")
        state.load_error = f"{type(e).__name__}: {e}"
        if backend is not None:
            await backend.close()
        return
    engine = Engine(
        backend,
        state.metrics,
        queue_size=s.queue_size,
        max_batch_size=s.max_batch_size,
        batch_wait_s=s.batch_wait_ms / 1000,
        max_inflight=s.max_inflight_batches,
    )
    engine.start()
    service = TeacherService(backend, store, engine, state.metrics, max_k=s.max_k)
    jobs = JobStore(store.state_dir / "jobs.sqlite")
    manager = JobManager(service, jobs, chunk_rows=s.job_chunk_rows)
    state.runtime = _Runtime(backend, store, engine, service, jobs, manager)
    resumed = manager.resume_unfinished()
    if resumed:
        log.info("resumed jobs %s", ", ".join(resumed))


async def _flush_periodically(state: _State) -> None:
    while True:
        await asyncio.sleep(1.0)
        if state.runtime is not None:
            try:
                await asyncio.to_thread(state.runtime.store.flush_due)
            except Exception:
                log.exception("publishing pending rows failed; they stay pending")


async def _stop(state: _State) -> None:
    rt, state.runtime = state.runtime, None
    if rt is None:
        return
    await rt.manager.stop()
    await rt.engine.stop()
    await asyncio.to_thread(rt.store.close)
    rt.jobs.close()
    await rt.backend.close()


# -- dependencies -----------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False)


async def _authorized(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    token = request.app.state.distill.settings.token()
    if token is None:
        return
    if credentials is None or not secrets.compare_digest(
        credentials.credentials.encode(), token.encode()
    ):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def _ready(request: Request) -> _Runtime:
    state: _State = request.app.state.distill
    if state.runtime is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            state.load_error or "the teacher is still loading",
            headers={"Retry-After": str(_LOADING_RETRY_AFTER)},
        )
    return state.runtime


Runtime = Annotated[_Runtime, Depends(_ready)]


# -- the app ----------------------------------------------------------------------------


def create_app(settings: TeacherSettings, load_backend: BackendLoader) -> FastAPI:
    """The service for ``settings``; ``load_backend`` is awaited in the background at startup."""
    settings.data_root.mkdir(parents=True, exist_ok=True)
    data_root = settings.data_root.resolve()
    state = _State(settings, ServiceMetrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_start(state, load_backend))
        ticker = asyncio.create_task(_flush_periodically(state))
        try:
            yield
        finally:
            ticker.cancel()
            loading.cancel()
            await asyncio.gather(ticker, loading, return_exceptions=True)
            await _stop(state)

    app = FastAPI(
        title="distillcache teacher",
        summary="A teacher-logit cache for knowledge distillation.",
        version="1",
        lifespan=lifespan,
    )
    app.state.distill = state

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        began = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        state.metrics.requests.labels(path, str(response.status_code)).inc()
        state.metrics.request_seconds.labels(path).observe(time.perf_counter() - began)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        return _unprocessable(
            [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
        )

    @app.exception_handler(QueryError)
    async def invalid_query(request: Request, exc: QueryError) -> JSONResponse:
        return _unprocessable(
            [{"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}]
        )

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)},
            status_code=status.HTTP_429_TOO_MANY_REQUESTS,
            headers={"Retry-After": str(exc.retry_after)},
        )

    @app.get("/healthz", tags=["probes"])
    async def healthz() -> JSONResponse:
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": state.load_error}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", tags=["probes"])
    async def readyz() -> JSONResponse:
        rt = state.runtime
        if rt is None:
            body = (
                {"status": "failed", "error": state.load_error}
                if state.load_error
                else {"status": "loading"}
            )
            return JSONResponse(body, 503, headers={"Retry-After": str(_LOADING_RETRY_AFTER)})
        return JSONResponse(
            {
                "status": "ready",
                "model": rt.backend.model_id,
                "backend": rt.backend.name,
                "max_k": rt.service.max_k,
                "max_model_len": rt.backend.max_model_len,
            }
        )

    @app.get("/metrics", tags=["probes"])
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorized)])

    @v1.post("/generate", response_model=TeacherAnswer, tags=["teacher"])
    async def generate(body: GenerateBody, rt: Runtime) -> TeacherAnswer:
        """Generate a completion with the teacher's top-k log-probs at every position."""
        sampling = Sampling(body.max_tokens, body.temperature, body.top_p, body.seed)
        k = body.k or settings.default_k
        prompt = _render(rt.backend, body)
        query = Query("generate", tuple(prompt), k, sampling=sampling)
        _check(rt.service, query, {"prompt": body.prompt_field()})
        [answer] = await rt.service.answer([query], store=body.store)
        return _answer(answer, settings)

    @v1.post("/score", response_model=ScoreResponse, tags=["teacher"])
    async def score(body: ScoreBody, rt: Runtime) -> ScoreResponse:
        """Score (prompt, completion) pairs by teacher forcing."""
        k = body.k or settings.default_k
        queries = []
        for i, pair in enumerate(body.pairs):
            prompt, completion = _render_pair(rt.backend, pair, i)
            query = Query(
                "score",
                tuple(prompt),
                k,
                completion_ids=tuple(completion),
                logprob_start=pair.logprob_start,
            )
            completion_field = "completion" if pair.completion is not None else "completion_ids"
            where = f"pairs.{i}."
            _check(
                rt.service,
                query,
                {
                    "prompt": where + pair.prompt_field(),
                    "completion": where + completion_field,
                    "logprob_start": where + "logprob_start",
                },
            )
            queries.append(query)
        answers = await rt.service.answer(queries, store=body.store)
        return ScoreResponse(results=[_answer(a, settings) for a in answers])

    @v1.post("/jobs", response_model=Job, status_code=201, tags=["jobs"])
    async def create_job(body: JobCreate, rt: Runtime) -> Job:
        """Start a batch job over an input file; the output dataset is created if new."""
        path = _confined(data_root, body.input, "input")
        if not path.is_file():
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"input: {body.input!r} is not a file")
        if not path.name.lower().endswith(SUFFIXES):
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                f"input: {body.input!r} has an unknown format; accepted: {', '.join(SUFFIXES)}",
            )
        output = _dataset_name(body.output, "output")
        k = body.k or settings.default_k
        if k > rt.service.max_k:
            raise QueryError("k", f"must be between 1 and {rt.service.max_k}, got {k}")
        spec = JobSpec(
            input=str(path),
            output=output,
            k=k,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
        try:
            await asyncio.to_thread(
                rt.store.open_dataset, output, k, SamplingInfo(**spec.sampling().as_dict())
            )
        except (DatasetError, ValueError) as e:
            raise HTTPException(status.HTTP_409_CONFLICT, f"output: {e}") from None
        job = rt.jobs.create(spec, "service")
        rt.manager.start(job.id)
        return job

    @v1.get("/jobs", response_model=list[Job], tags=["jobs"])
    async def list_jobs(rt: Runtime) -> list[Job]:
        return rt.jobs.list()

    @v1.get("/jobs/{job_id}", response_model=Job, tags=["jobs"])
    async def get_job(job_id: str, rt: Runtime) -> Job:
        """A job's state and progress, with the first input errors by line number."""
        return _job(rt, job_id)

    @v1.post("/jobs/{job_id}/cancel", response_model=Job, tags=["jobs"])
    async def cancel_job(job_id: str, rt: Runtime) -> Job:
        """Stop a job after its current step; what it computed stays stored."""
        job = _job(rt, job_id)
        if job.state in ("queued", "running"):
            rt.manager.cancel(job_id)
        return _job(rt, job_id)

    @v1.post("/jobs/{job_id}/resume", response_model=Job, tags=["jobs"])
    async def resume_job(job_id: str, rt: Runtime) -> Job:
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

    @v1.get("/datasets", response_model=list[DatasetSummary], tags=["datasets"])
    async def list_datasets(rt: Runtime) -> list[DatasetSummary]:
        names = await asyncio.to_thread(dataset_names, data_root)
        return [await asyncio.to_thread(_summary, rt, data_root, n) for n in names]

    @v1.get("/datasets/{name}", response_model=DatasetSummary, tags=["datasets"])
    async def get_dataset(name: str, rt: Runtime) -> DatasetSummary:
        name = _dataset_name(name, "name")
        if name not in await asyncio.to_thread(dataset_names, data_root):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"name: no dataset {name!r}")
        return await asyncio.to_thread(_summary, rt, data_root, name)

    app.include_router(v1)
    return app


# -- helpers ----------------------------------------------------------------------------


def _unprocessable(errors: list[dict[str, Any]]) -> JSONResponse:
    def where(loc: list[Any]) -> str:
        parts = loc[1:] if loc and loc[0] == "body" and len(loc) > 1 else loc
        return ".".join(str(p) for p in parts)

    message = "; ".join(f"{where(e['loc'])}: {e['msg']}" for e in errors)
    return JSONResponse(
        {"detail": errors, "message": message}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT
    )


def _check(service: TeacherService, query: Query, fields: dict[str, str]) -> None:
    """service.check, with its generic field names turned into the request's own."""
    try:
        service.check(query)
    except QueryError as e:
        raise QueryError(fields.get(e.field, e.field), e.message) from None


def _render(backend: TeacherBackend, body: _Prompt, where: str = "") -> list[int]:
    """Prompt token ids of a request: ids as given; text and chats, checked by the rules
    of a job's rows, through the chat template."""
    if body.prompt_ids is not None:
        return list(body.prompt_ids)
    record: dict[str, Any] = (
        {"prompt": body.prompt}
        if body.prompt is not None
        else {"messages": [m.model_dump() for m in body.messages or []]}
    )
    row = parse_row("request", 0, record)
    if isinstance(row, InputError):
        raise QueryError(where + body.prompt_field(), row.message)
    return render_prompt(backend.tokenizer, row)


def _render_pair(backend: TeacherBackend, pair: ScorePair, i: int) -> tuple[list[int], list[int]]:
    prompt = _render(backend, pair, f"pairs.{i}.")
    if pair.completion_ids is not None:
        return prompt, list(pair.completion_ids)
    row = InputRow("request", 0, [], pair.completion, {})
    try:
        return prompt, render_completion(backend.tokenizer, row)
    except ValueError as e:
        raise QueryError(f"pairs.{i}.completion", str(e)) from None


def _answer(answer: Answer, settings: TeacherSettings) -> TeacherAnswer:
    """An answer as the API returns it: through the store's codec, most likely first."""
    r: SequenceRecord = answer.record
    codec = settings.logprob_codec
    lps = decode_logprobs(encode_logprobs(r.topk_logprobs, codec), codec)
    order = np.lexsort((r.topk_ids, -lps), axis=-1)
    ids = np.take_along_axis(r.topk_ids, order, axis=-1)
    lps = np.take_along_axis(lps, order, axis=-1)
    return TeacherAnswer(
        key=r.key,
        cached=answer.cached,
        dataset=answer.dataset,
        prompt_ids=r.prompt_ids.tolist(),
        completion_ids=r.completion_ids.tolist(),
        completion_text=r.completion_text,
        finish_reason=r.finish_reason,
        logprob_start=int(r.logprob_start),
        topk_ids=ids.tolist(),
        topk_logprobs=lps.tolist(),
        token_logprob=_finite(r.token_logprob),
        tail_logprob=_finite(r.tail_logprob),
    )


def _finite(values: np.ndarray | None) -> list[float | None]:
    if values is None:
        return []
    return [float(v) if np.isfinite(v) else None for v in values]


def _confined(data_root: Path, raw: str, field: str) -> Path:
    """``raw`` (relative to the data root, or absolute) resolved; 403 when it leaves the root."""
    path = Path(raw)
    full = (path if path.is_absolute() else data_root / path).resolve()
    if not full.is_relative_to(data_root):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{field}: {raw!r} is outside the data root")
    return full


def _dataset_name(raw: str, field: str) -> str:
    try:
        return check_dataset_name(raw)
    except ValueError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{field}: {e}") from None


def _job(rt: _Runtime, job_id: str) -> Job:
    job = rt.jobs.get(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job_id: no job {job_id!r}")
    return job


def _summary(rt: _Runtime, data_root: Path, name: str) -> DatasetSummary:
    try:
        m = read_manifest(data_root / name)
    except DatasetError as e:
        return DatasetSummary(name=name, error=str(e))
    return DatasetSummary(
        name=name,
        rows=m.rows,
        tokens=m.tokens,
        bytes=m.bytes,
        shards=len(m.shards),
        pending_rows=rt.store.pending_rows(name),
        updated=m.updated,
        info=m.info,
    )
