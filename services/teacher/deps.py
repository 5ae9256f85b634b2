"""What the routes depend on: the app's state, the ready runtime, a guard against clients
that leave, and the checks of names and paths that several routes share. (Bearer auth
runs before any of this, in gate.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request, status

from .backend import Query
from .limits import QueryError
from .metrics import ServiceMetrics
from .runtime import Runtime
from .settings import TeacherSettings
from .store import check_dataset_name

# Seconds a client is told to wait while the model is still loading.
LOADING_RETRY_AFTER = 5
# How often a request waiting for the teacher checks that its client is still there.
_DISCONNECT_POLL_S = 0.25
# nginx's code for "client closed the request": nobody reads it, but logs and metrics do.
CLIENT_CLOSED = 499

T = TypeVar("T")


class AppState:
    """What the app holds between requests: set up by the lifespan, read by the routes."""

    def __init__(self, settings: TeacherSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.data_root = settings.data_root.resolve()
        self.runtime: Runtime | None = None
        self.load_error: str | None = None


def app_state(request: Request) -> AppState:
    return request.app.state.distill


State = Annotated[AppState, Depends(app_state)]


async def ready_runtime(state: State) -> Runtime:
    if state.runtime is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            state.load_error or "the teacher is still loading",
            headers={"Retry-After": str(LOADING_RETRY_AFTER)},
        )
    return state.runtime


Ready = Annotated[Runtime, Depends(ready_runtime)]


def confined(data_root: Path, raw: str, field: str) -> Path:
    """``raw`` (relative to the data root, or absolute) resolved; 403 when it leaves the root."""
    try:
        path = Path(raw)
        full = (path if path.is_absolute() else data_root / path).resolve()
    except (OSError, ValueError) as e:  # a NUL byte, a name longer than the system allows
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{field}: {raw!r}: {e}") from None
    if not full.is_relative_to(data_root):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{field}: {raw!r} is outside the data root")
    return full


def dataset_name(raw: str, field: str) -> str:
    try:
        return check_dataset_name(raw)
    except ValueError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{field}: {e}") from None


class ClientGone(Exception):
    """The client disconnected while its request waited; its work was cancelled."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or ClientGone once the client has disconnected: its work is
    cancelled, which frees its place in the teacher's queue (Starlette itself never
    cancels a handler whose client left)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientGone()


def check_answer_size(queries: list[Query], max_entries: int) -> None:
    """413 before the teacher runs when the answers would hold more than ``max_entries``
    log-probs (setting max_response_entries): every route that answers queries asks this."""
    entries = sum(q.answer_entries for q in queries)
    if entries > max_entries:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"the answer would hold {entries:,} log-probs (positions x k); the server sends "
            f"at most {max_entries:,} per request (setting max_response_entries): ask for "
            "fewer or shorter sequences, a smaller k or fewer max_tokens",
        )


def checked(
    rt: Runtime, make: Callable[[], Query | None], field_name: Callable[[str], str]
) -> Query | None:
    """The query ``make`` builds (None: nothing to ask), within the teacher's limits; a
    QueryError from either names the body's own field (``field_name`` maps the generic
    part). Every route that turns a body into queries goes through this."""
    try:
        query = make()
        if query is not None:
            rt.service.limits.check(query)
    except QueryError as e:
        raise QueryError(field_name(e.field), e.message) from None
    return query
