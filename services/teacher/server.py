"""How the app runs under uvicorn: the idle timeout and the connection limit.

uvicorn closes a keep-alive connection that stays idle after a response, but a
connection that never sends a request is kept forever: 600 such sockets under a 512-fd
limit left /healthz unanswered. ``IdleTimeoutH11Protocol`` arms uvicorn's own keep-alive
timer when a connection opens too, so a socket that sends nothing for
``keep_alive_seconds`` is closed; ``max_connections`` (uvicorn's ``limit_concurrency``)
answers 503 at once beyond it instead of running out of descriptors.
"""

from __future__ import annotations

import asyncio

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import TeacherSettings


class IdleTimeoutH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )


def server_config(
    app: FastAPI, settings: TeacherSettings, log_level: str = "info"
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        http=IdleTimeoutH11Protocol,
        timeout_keep_alive=settings.keep_alive_seconds,
        limit_concurrency=settings.max_connections,
    )
