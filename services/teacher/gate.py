"""The gate in front of the app: bearer auth and the body-size limit, before any body is read.

FastAPI reads and parses a request's body before it runs a route's dependencies, so an
auth dependency would let an unauthenticated client make the server read and parse
hundreds of megabytes (measured: a 300 MB body took 10.9 s and 1.6 GB before its 401,
while /healthz went unanswered). This ASGI middleware answers first: a request without
the right ``Authorization: Bearer <token>`` gets 401 from its headers alone; a body
declared (``Content-Length``) or found (chunked) larger than ``max_body_bytes`` gets 413,
naming the limit and its setting.

Every path is gated except ``OPEN_PATHS``: the probes (``/healthz``, ``/readyz`` and
vLLM's ``/health`` and the older TRL server's ``/health/``, which TRL waits on), ``/metrics`` and the docs, for orchestrators.
Gating all the rest, rather than listing what to protect, covers the foreign protocols'
paths outside ``/v1`` (TRL's weight-sync endpoints) and any route added later.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/health", "/health/", "/metrics", "/openapi.json"}
    | {"/docs", "/docs/oauth2-redirect", "/redoc"}
)


class RequestGate:
    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is not None and not self._authorized(headers.get("authorization", "")):
            await _reply(
                send,
                401,
                {"detail": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                [(b"www-authenticate", b"Bearer")],
            )
            return
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await _reply(send, 400, {"detail": "Content-Length is not a number"})
                return
            if int(declared) > self.max_body_bytes:
                await _reply(send, 413, self._too_large())
                return
            await self.app(scope, receive, send)
            return
        # A body without a declared length is read here, up to the limit, then replayed.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await _reply(send, 413, self._too_large())
                return
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], then=receive), send)

    def _authorized(self, header: str) -> bool:
        scheme, _, credentials = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            credentials.strip().encode(), self.token.encode()
        )

    def _too_large(self) -> dict[str, Any]:
        return {
            "detail": f"the request body is larger than {self.max_body_bytes} bytes "
            "(setting max_body_bytes, DISTILL_MAX_BODY_BYTES)"
        }


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """A ``receive`` that hands out ``messages`` first, then defers to ``then``."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


async def _reply(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
