"""The teacher's HTTP app: lifespan, middleware, error shapes and the routers.

Endpoints (JSON; OpenAPI at /docs), one router module per resource:
routes_teacher.py (``/v1/generate``, ``/v1/score``), routes_jobs.py (``/v1/jobs``),
routes_datasets.py (``/v1/datasets``), routes_probes.py (``/healthz``, ``/readyz``,
``/metrics``); and the foreign protocols, thin adapters over the same service:
routes_openai.py (vLLM's ``/v1/completions``, ``/v1/models``), routes_trl.py (``/health``,
the older ``trl vllm-serve`` endpoints, TRL's weight-sync paths: 501), routes_sglang.py
(SGLang's ``/generate``, scoring only). Wire models are protocol.py (protocol_openai.py,
protocol_trl.py and protocol_sglang.py for the foreign protocols); shared dependencies
are deps.py.

The model loads in the background after startup, so /healthz answers at once and /v1
answers 503 until /readyz does. With an auth token set, every path needs
``Authorization: Bearer <token>`` (401 otherwise, from the headers alone: gate.py);
probes, metrics and docs stay open for orchestrators.

Every refusal of input names the field: unknown fields and out-of-range values are 422
with FastAPI's ``detail`` list plus a ``message`` string; limits that depend on the
loaded teacher (k above its maximum, a prompt longer than its context) use the same
shape; paths outside the data root are 403, malformed paths and names 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from . import (
    routes_datasets,
    routes_jobs,
    routes_openai,
    routes_probes,
    routes_sglang,
    routes_teacher,
    routes_trl,
)
from .backend import TeacherBackend
from .batcher import QueueFull
from .deps import AppState
from .gate import RequestGate
from .limits import QueryError
from .metrics import RequestCounter, ServiceMetrics
from .runtime import build_runtime
from .settings import TeacherSettings

log = logging.getLogger(__name__)

BackendLoader = Callable[[], Awaitable[TeacherBackend]]


def create_app(
    settings: TeacherSettings,
    load_backend: BackendLoader,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The service for ``settings``; ``load_backend`` is awaited in the background at startup.

    When loading fails the app answers 503 with the error; ``on_load_failure`` (what
    `distill serve` passes) is called with it, to stop the server instead: a teacher that
    cannot load is a start-up failure an operator or orchestrator must see."""
    settings.data_root.mkdir(parents=True, exist_ok=True)
    state = AppState(settings, ServiceMetrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(_start(state, load_backend, on_load_failure)),
            asyncio.create_task(_tick(state)),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            runtime, state.runtime = state.runtime, None
            if runtime is not None:
                await runtime.close()

    app = FastAPI(
        title="distillcache teacher",
        summary="A teacher-logit cache for knowledge distillation.",
        version="1",
        lifespan=lifespan,
    )
    app.state.distill = state

    # The last added runs first: requests are counted, then gated (401s and 413s count).
    app.add_middleware(RequestGate, token=settings.token(), max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestCounter, metrics=state.metrics)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(QueryError, _invalid_query)
    app.add_exception_handler(QueueFull, _queue_full)
    for module in (
        routes_probes,
        routes_teacher,
        routes_jobs,
        routes_datasets,
        routes_openai,
        routes_trl,
        routes_sglang,
    ):
        app.include_router(module.router)
    return app


async def _start(
    state: AppState, load_backend: BackendLoader, on_failure: Callable[[str], None] | None
) -> None:
    """Load the backend, build the runtime, resume the jobs a previous server left."""
    try:
        state.runtime = await build_runtime(state.settings, await load_backend(), state.metrics)
    except Exception as e:
        log.exception("the teacher failed to load")
        state.load_error = f"{type(e).__name__}: {e}"
        if on_failure is not None:
            on_failure(state.load_error)
        return
    resumed = state.runtime.manager.resume_unfinished()
    if resumed:
        log.info("resumed jobs %s", ", ".join(resumed))


async def _tick(state: AppState) -> None:
    """Publish pending rows that have waited ``flush_seconds``; checked every second."""
    while True:
        await asyncio.sleep(1.0)
        if state.runtime is not None:
            try:
                await asyncio.to_thread(state.runtime.store.flush_due)
            except Exception:
                log.exception("publishing pending rows failed; they stay pending")


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for e in exc.errors():
        if e["type"] == "json_invalid":
            # FastAPI puts the character offset where a field name would go.
            at = e["loc"][-1]
            e = {**e, "loc": ["body"], "msg": f"invalid JSON at character {at}: {e['msg']}"}
        errors.append({"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]})
    return _unprocessable(errors)


async def _invalid_query(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QueryError)
    return _unprocessable([{"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}])


async def _queue_full(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QueueFull)
    return JSONResponse(
        {"detail": str(exc)},
        status_code=status.HTTP_429_TOO_MANY_REQUESTS,
        headers={"Retry-After": str(exc.retry_after)},
    )


def _unprocessable(errors: list[dict[str, Any]]) -> JSONResponse:
    def where(loc: list[Any]) -> str:
        parts = loc[1:] if loc and loc[0] == "body" and len(loc) > 1 else loc
        return ".".join(str(p) for p in parts)

    message = "; ".join(f"{where(e['loc'])}: {e['msg']}" for e in errors)
    return JSONResponse(
        {"detail": errors, "message": message}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT
    )
