"""The teacher runtime: a loaded backend and everything that serves from it, built once.

``build_runtime`` assembles store, batcher, service and job store for a backend, the same
way for ``distill serve`` (behind HTTP), ``distill cache`` (one job in-process) and the
tests, so the three cannot drift apart. ``open_backend`` loads the backend the settings
name.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .backend import TeacherBackend
from .batcher import Batcher
from .identity import TeacherIdentity
from .job_runner import JobManager
from .jobs import JobStore
from .metrics import ServiceMetrics
from .service import TeacherService
from .settings import TeacherSettings
from .store import TeacherStore


@dataclass
class Runtime:
    backend: TeacherBackend
    store: TeacherStore
    batcher: Batcher
    service: TeacherService
    jobs: JobStore
    manager: JobManager

    async def close(self) -> None:
        """Stop jobs (left resumable) and the batcher, publish pending rows, free the model."""
        await self.manager.stop()
        await self.batcher.stop()
        await asyncio.to_thread(self.store.close)
        self.jobs.close()
        await self.backend.close()


async def open_backend(settings: TeacherSettings) -> TeacherBackend:
    """Load the teacher the settings name; settings left unset take the backend's default.

    transformers loads in a worker thread so the server's event loop keeps answering
    probes; vLLM's engine is built on the loop it will serve from.
    """
    options = {
        name: value
        for name, value in (("dtype", settings.dtype), ("max_model_len", settings.max_model_len))
        if value is not None
    }
    if settings.backend == "transformers":
        from .backend_transformers import TransformersBackend

        if settings.device is not None:
            options["device"] = settings.device
        return await asyncio.to_thread(
            TransformersBackend, settings.model, max_k=settings.max_k, **options
        )
    from .backend_vllm import VllmBackend

    if settings.gpu_memory_utilization is not None:
        options["gpu_memory_utilization"] = settings.gpu_memory_utilization
    return VllmBackend(
        settings.model, max_k=settings.max_k, enforce_eager=settings.enforce_eager, **options
    )


async def build_runtime(
    settings: TeacherSettings, backend: TeacherBackend, metrics: ServiceMetrics
) -> Runtime:
    """Everything that serves from ``backend``, started. The backend is closed when the
    rest cannot be built (an unreadable data root), so a failed start leaks nothing."""
    try:
        store = await asyncio.to_thread(
            TeacherStore,
            settings.data_root,
            TeacherIdentity.of(backend),
            codec=settings.stored_codec,
            flush_rows=settings.flush_rows,
            flush_seconds=settings.flush_seconds,
            row_group_tokens=settings.row_group_tokens,
            sources=settings.cache_sources,
            adaptive=settings.adaptive_k,
            sampled=settings.sampled,
        )
        jobs = JobStore(store.state_dir / "jobs.sqlite")
    except BaseException:
        await backend.close()
        raise
    batcher = Batcher(
        backend,
        metrics,
        queue_size=settings.queue_size,
        max_batch_size=settings.max_batch_size,
        batch_wait_s=settings.batch_wait_ms / 1000,
        max_inflight=settings.max_inflight_batches,
    )
    batcher.start()
    service = TeacherService(backend, store, batcher, metrics, max_k=settings.max_k)
    manager = JobManager(service, jobs, chunk_rows=settings.job_chunk_rows)
    return Runtime(backend, store, batcher, service, jobs, manager)
