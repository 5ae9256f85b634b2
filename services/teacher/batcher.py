"""The bounded request queue and micro-batcher in front of the backend.

HTTP requests that miss the cache wait here. A worker takes the oldest entry, lets a
partial batch gather for ``batch_wait_s`` (a few ms), and hands up to ``max_batch_size``
sequences of one kind (generate or score) to the backend in one call. At most
``max_inflight`` backend calls run at once (batch jobs included), so the queue, not the
backend, absorbs a burst. When ``queue_size`` requests are already waiting, ``submit``
refuses at once with ``QueueFull`` (the HTTP layer's 429 + Retry-After): a client learns
immediately that it should back off, instead of holding a connection for minutes.

Batch jobs call ``run``: they bring their own batches, skip the queue (a job must never be
refused) and take turns with the HTTP worker for the backend.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass

from .backend import Mode, Query, TeacherBackend, TeacherOutput
from .metrics import ServiceMetrics


class QueueFull(Exception):
    """The queue is full; ``retry_after`` is a guess, in whole seconds, of when to retry."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the teacher's queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class _Entry:
    """One HTTP request's sequences; compared by identity (the queue removes this one)."""

    kind: Mode
    requests: list[Query]
    future: asyncio.Future[list[TeacherOutput]]


class Batcher:
    def __init__(
        self,
        backend: TeacherBackend,
        metrics: ServiceMetrics,
        *,
        queue_size: int,
        max_batch_size: int,
        batch_wait_s: float,
        max_inflight: int,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.queue_size = queue_size
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_inflight = max_inflight
        self._queue: deque[_Entry] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(max_inflight)
        self._worker: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()
        # Seconds per backend call, smoothed; seeds Retry-After before the first call ends.
        self._call_seconds = 1.0

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name="distill-batcher")

    async def stop(self) -> None:
        tasks = [t for t in (self._worker, *self._batches) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(RuntimeError("the teacher service is shutting down"))
        self.metrics.queue_depth.set(0)

    def retry_after(self) -> int:
        """Time to drain the queue at the recent pace, in whole seconds (at least 1): the
        backend calls its queued sequences need, plus the one running, at the smoothed
        seconds per call."""
        calls = math.ceil(self._queued_sequences() / self.max_batch_size) / self.max_inflight
        return max(1, math.ceil((calls + 1) * self._call_seconds))

    async def submit(self, kind: Mode, requests: list[Query]) -> list[TeacherOutput]:
        """Queue one HTTP request's sequences; raises QueueFull when the queue is full."""
        if len(self._queue) >= self.queue_size:
            raise QueueFull(self.retry_after())
        entry = _Entry(kind, requests, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        self.metrics.queue_depth.set(len(self._queue))
        self._arrived.set()
        try:
            return await entry.future
        finally:
            if entry in self._queue:
                # The client went away before its turn came: free its place.
                self._queue.remove(entry)
                self.metrics.queue_depth.set(len(self._queue))

    async def run(self, kind: Mode, requests: list[Query]) -> list[TeacherOutput]:
        """Run a batch job's sequences without queueing, in turn with the HTTP worker."""
        async with self._slots:
            outputs = await self._call(kind, requests)
        for output in outputs:
            if isinstance(output, Exception):
                raise output
        return outputs

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire()
            try:
                if self.batch_wait_s and self._queued_sequences() < self.max_batch_size:
                    await asyncio.sleep(self.batch_wait_s)
                batch = self._take_batch()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run_batch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _queued_sequences(self) -> int:
        return sum(len(e.requests) for e in self._queue)

    def _take_batch(self) -> list[_Entry]:
        """The oldest entry and the next ones of its kind, up to max_batch_size sequences."""
        batch: list[_Entry] = []
        size = 0
        kind = self._queue[0].kind if self._queue else None
        for entry in list(self._queue):
            if entry.kind != kind:
                continue
            if batch and size + len(entry.requests) > self.max_batch_size:
                break
            self._queue.remove(entry)
            if entry.future.done():
                continue
            batch.append(entry)
            size += len(entry.requests)
        self.metrics.queue_depth.set(len(self._queue))
        return batch

    async def _run_batch(self, batch: list[_Entry]) -> None:
        try:
            requests = [r for entry in batch for r in entry.requests]
            outputs = await self._call(batch[0].kind, requests)
        except BaseException as e:
            error = e if isinstance(e, Exception) else RuntimeError("the service is stopping")
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(error)
            if not isinstance(e, Exception):
                raise
            return
        finally:
            self._slots.release()
        start = 0
        for entry in batch:
            part = outputs[start : start + len(entry.requests)]
            start += len(entry.requests)
            if entry.future.done():
                continue
            failed = next((o for o in part if isinstance(o, Exception)), None)
            if failed is not None:
                entry.future.set_exception(failed)
            else:
                entry.future.set_result(part)

    async def _call(self, kind: Mode, requests: list[Query]) -> list[TeacherOutput | Exception]:
        """Outputs in request order; a request the backend fails on gets its exception.

        A backend call that raises is retried one request at a time, so one bad request
        fails alone instead of taking every request batched with it down.
        """
        outputs: list[TeacherOutput | Exception] = []
        for start in range(0, len(requests), self.max_batch_size):
            chunk = requests[start : start + self.max_batch_size]
            try:
                outputs += await self._backend_call(kind, chunk)
            except Exception as e:
                if len(chunk) == 1:
                    outputs.append(e)
                    continue
                for request in chunk:
                    try:
                        outputs += await self._backend_call(kind, [request])
                    except Exception as alone:
                        outputs.append(alone)
        return outputs

    async def _backend_call(self, kind: Mode, chunk: list[Query]) -> list[TeacherOutput]:
        began = time.monotonic()
        if kind == "generate":
            got = await self.backend.generate(chunk)
        else:
            got = await self.backend.score(chunk)
        if len(got) != len(chunk):
            raise RuntimeError(
                f"backend {self.backend.name} returned {len(got)} outputs for {len(chunk)}"
            )
        self._call_seconds = 0.8 * self._call_seconds + 0.2 * (time.monotonic() - began)
        self.metrics.batch_size.observe(len(chunk))
        self.metrics.teacher_sequences.inc(len(got))
        self.metrics.teacher_tokens.inc(sum(len(o.prompt_ids) + len(o.completion_ids) for o in got))
        return got
