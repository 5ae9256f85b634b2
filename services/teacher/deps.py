"""What the routes depend on: the app's state, bearer auth, the ready runtime, and the
checks of names and paths that several routes share."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .metrics import ServiceMetrics
from .runtime import Runtime
from .settings import TeacherSettings
from .store import check_dataset_name

# Seconds a client is told to wait while the model is still loading.
LOADING_RETRY_AFTER = 5


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

_bearer = HTTPBearer(auto_error=False)


async def authorized(
    state: State,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    token = state.settings.token()
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
    path = Path(raw)
    full = (path if path.is_absolute() else data_root / path).resolve()
    if not full.is_relative_to(data_root):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{field}: {raw!r} is outside the data root")
    return full


def dataset_name(raw: str, field: str) -> str:
    try:
        return check_dataset_name(raw)
    except ValueError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{field}: {e}") from None
