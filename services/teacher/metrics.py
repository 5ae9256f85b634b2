"""The service's Prometheus metrics, on a registry of their own (one per app, none global).

Tokens are counted in one unit on both sides, prompt plus completion tokens of a
sequence, so ``distill_cache_tokens_total / (distill_cache_tokens_total +
distill_teacher_tokens_total)`` is the share of the work the cache saved.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.teacher_tokens = Counter(
            "distill_teacher_tokens",
            "Tokens (prompt + completion) the teacher ran forward passes over.",
            registry=self.registry,
        )
        self.cache_tokens = Counter(
            "distill_cache_tokens",
            "Tokens (prompt + completion) of answers served from the cache instead.",
            registry=self.registry,
        )
        self.teacher_sequences = Counter(
            "distill_teacher_sequences",
            "Sequences the teacher produced.",
            registry=self.registry,
        )
        self.cache_lookups = Counter(
            "distill_cache_lookups",
            "Cache lookups by result.",
            ["result"],
            registry=self.registry,
        )
        self.requests = Counter(
            "distill_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "distill_request_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "distill_queue_depth",
            "HTTP requests waiting for the teacher.",
            registry=self.registry,
        )
        self.store_failures = Counter(
            "distill_store_failures",
            "Answers the teacher produced that could not be stored (answered unstored).",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "distill_batch_sequences",
            "Sequences per backend call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware counting requests by route and status, and timing them.

    Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``: that one hands the app a
    wrapped ``receive`` under which ``request.is_disconnected()`` never turns true, and
    a request whose client left must be cancelled (deps.unless_disconnected). A response
    that never started (the client was gone) counts as 499.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 499

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        except Exception:
            status = 500
            raise
        finally:
            # The router records the matched route in the scope it was given.
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - began)
