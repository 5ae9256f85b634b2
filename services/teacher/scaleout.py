"""Scale-out capture on Ray: `distill cache --ray`, one input file over N teacher workers.

Two parts, one process each kind:

- The planner (``run_capture``, in the driver) reads the input with our own parser
  (``shared.inputs``, through ``job_runner.prepare_rows``), turns each row into the very
  query a single-process job would make, keys it with the workers' ``TeacherIdentity``,
  and drops rows whose key the dataset already holds (or that an earlier row of the file
  has). Only the rest go to the workers, in chunks of ``job_chunk_rows``.
- A worker (``CaptureWorker``, one Ray actor) holds one backend (transformers, or vLLM on
  a GPU) and the same runtime `distill cache` builds (runtime.py): it answers its chunks
  through ``TeacherService.answer``, so rows any dataset of the data root holds are
  copied rather than recomputed, and publishes shards with its own ShardWriter under its
  own writer id (host-pid-random). Several writers share one dataset the way replicas
  do: shards are immutable and the manifest update is serialized (shared/manifest.py).
  A dataset on object storage (``s3://``) is written by the store the same way (it names
  it by its URI and indexes its keys beside the local datasets').

Why the planner, not Ray Data, reads the input: the keys need the tokenizer and the
teacher's identity, which the workers' backends define, and one input parser (with its
line-numbered errors) must serve both `distill cache` paths. The workers' tokenizer is
shipped to the planner, so a row's prompt ids (and so its key) are the ones the worker
would compute. Why not ``ray.data.llm``: its vLLM stage does return top-k log-probs, but
as one Python dict per position through its own chat template and tokenizer; our keys,
numerics identity, tail mass and codec would then live in a second code path.

Every row exactly once. Resume is the key filter, nothing else: a row is done when a
published shard holds its key. A worker's rows become published in shards of
``flush_rows`` (or after ``flush_seconds``), so a worker killed mid-run loses the rows it
had not yet published, including rows of chunks it had already reported done. Ray
restarts the actor (up to ``WORKER_RESTARTS`` times) and runs the chunks it had queued,
the interrupted one included, on the new process; when the pass over the input ends the
planner flushes every worker, reads the published keys again and sends the planned rows
still missing through another pass. Nothing is written twice: the planner never sends a
key twice in a pass, the next pass starts only after every worker published what it
holds, a worker's store skips keys its dataset already holds (a chunk run again after a
kill between publishing and replying), and a re-run of the command (after the driver
itself died) is the same filter. A worker that keeps dying is dropped; its chunks go to
the others in the next pass.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from distillcache.shared.inputs import iter_input_rows
from distillcache.shared.manifest import is_dataset
from distillcache.shared.reader import ShardDataset
from distillcache.shared.schema import KEY, SampledLogits
from distillcache.shared.storage import is_uri

from .backend import Query
from .identity import TeacherIdentity
from .job_runner import count_rows, prepare_rows
from .jobs import JobProgress, JobRowError, JobSpec
from .limits import Limits
from .settings import ScaleOut, TeacherSettings

# Times Ray restarts a worker whose process died before the capture gives up on it.
WORKER_RESTARTS = 3
# Chunks queued per worker: one running, one waiting, so a worker never idles on the planner.
CHUNKS_PER_WORKER = 2
# Passes over the input: the first, then passes for rows lost with a worker.
MAX_PASSES = 1 + WORKER_RESTARTS


@dataclass(frozen=True)
class PlanContext:
    """What the planner needs from the workers to make and key queries as they would."""

    identity: TeacherIdentity
    limits: Limits
    tokenizer: Any
    sampled: SampledLogits | None = None

    def key(self, query: Query) -> str:
        """The key a worker's service gives ``query`` (``TeacherService.key``)."""
        return self.identity.key(query.in_mode(self.sampled))


@dataclass
class CaptureResult:
    """How a capture went. ``progress`` counts each input row once (present, cached,
    teacher or failed), as a single-process job does; ``rows_recomputed`` are rows sent
    again because the worker that answered them died before publishing them."""

    progress: JobProgress
    errors: list[JobRowError] = field(default_factory=list)
    workers_restarted: int = 0
    workers_lost: int = 0
    rows_recomputed: int = 0
    passes: int = 0
    # Seconds until every worker had loaded its teacher (of the whole run's).
    startup_seconds: float = 0.0


class CaptureWorker:
    """One teacher backend and its store, in one Ray actor process (module docstring)."""

    def __init__(self, settings: TeacherSettings, spec: JobSpec, cpus: float) -> None:
        import tempfile

        import torch

        from .metrics import ServiceMetrics
        from .runtime import build_runtime, open_backend

        torch.set_num_threads(max(1, int(cpus)))
        self._dataset = spec.output
        # For a dataset on object storage (``spec.output`` a URI) the worker's runtime
        # keeps its state (the cache index) in a scratch directory of its node.
        self._scratch: Path | None = None
        if is_uri(spec.output):
            self._scratch = Path(tempfile.mkdtemp(prefix="distill-worker-"))
            settings = settings.model_copy(update={"data_root": self._scratch})
        # One loop for the actor's life: vLLM's engine serves from the loop it was built on.
        self._loop = asyncio.new_event_loop()

        async def start() -> Any:
            return await build_runtime(settings, await open_backend(settings), ServiceMetrics())

        # A worker that cannot start (a teacher that does not load, a dataset made by
        # another teacher) says why on its first call: Ray reports an error raised here
        # only as text inside its own ActorDiedError, and the user needs the one line.
        self._failure: Exception | None = None
        try:
            self._runtime = self._loop.run_until_complete(start())
            self._runtime.store.open_dataset(spec.output, spec.k, spec.as_sampling())
        except Exception as e:  # noqa: BLE001 - raised again by plan_context
            self._failure = e

    def pid(self) -> int:
        return os.getpid()

    def plan_context(self) -> PlanContext:
        if self._failure is not None:
            raise self._failure
        service = self._runtime.service
        store = self._runtime.store
        return PlanContext(store.identity, service.limits, service.backend.tokenizer, store.sampled)

    def answer(self, queries: list[Query], metas: list[dict[str, Any]]) -> JobProgress:
        """Answer one chunk into the dataset; rows are published by the store's flush
        policy (``flush_rows``, ``flush_seconds``), not per chunk, so shards stay large."""
        service = self._runtime.service
        answers = self._loop.run_until_complete(
            service.answer(queries, dataset=self._dataset, metas=metas, queue=False)
        )
        self._runtime.store.flush_due()
        counts = JobProgress()
        counts.count_answers(answers)
        return counts

    def flush(self) -> None:
        self._runtime.store.flush(self._dataset)

    def close(self) -> None:
        """Publish what is pending and free the model (and the scratch directory)."""
        self.flush()
        self._loop.run_until_complete(self._runtime.close())
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


def published_keys(path: Path | str) -> set[str]:
    """Keys the dataset at ``path`` (a directory or a URI) holds in shards its manifest
    lists (none: no dataset)."""
    if not is_dataset(path):
        return set()
    dataset = ShardDataset(path)
    return {key for table in dataset.iter_tables(columns=[KEY]) for key in table[KEY].to_pylist()}


def run_capture(
    settings: TeacherSettings,
    spec: JobSpec,
    scale: ScaleOut,
    *,
    on_progress: Callable[[JobProgress], None] | None = None,
) -> CaptureResult:
    """Capture ``spec.input`` into dataset ``spec.output`` of ``settings.data_root`` with
    ``scale.workers`` Ray workers. Joins the Ray session already started in this process,
    else ``scale.ray_address`` (else a new local cluster, shut down at the end)."""
    import ray

    started = not ray.is_initialized()
    if started:
        # Workers' own output stays in the Ray session's log files; errors come back here.
        ray.init(address=scale.ray_address, log_to_driver=False)
    actor = ray.remote(CaptureWorker).options(
        num_cpus=scale.worker_cpus,
        num_gpus=scale.worker_gpus,
        max_restarts=WORKER_RESTARTS,
        max_task_retries=WORKER_RESTARTS,
    )
    start = time.monotonic()
    workers = [actor.remote(settings, spec, scale.worker_cpus) for _ in range(scale.workers)]
    try:
        contexts = _get(ray, [w.plan_context.remote() for w in workers])
        startup = time.monotonic() - start
        differ = {c.identity for c in contexts}
        if len(differ) > 1:
            raise ValueError(
                f"the {len(workers)} workers loaded different teachers ({differ}); every "
                "node must hold the same model files and versions"
            )
        planner = _Planner(ray, workers, contexts[0], spec, on_progress)
        if spec.k > planner.context.limits.max_k:
            raise ValueError(
                f"--k {spec.k} is above the teacher engine's maximum {planner.context.limits.max_k}"
            )
        pids = _get(ray, [w.pid.remote() for w in workers])
        where = spec.output if is_uri(spec.output) else settings.data_root / spec.output
        result = planner.run(where, settings.job_chunk_rows)
        alive = sorted(planner.alive)
        now = _get(ray, [workers[i].pid.remote() for i in alive])
        result.startup_seconds = startup
        result.workers_restarted = sum(pids[i] != pid for i, pid in zip(alive, now, strict=True))
        _get(ray, [w.close.remote() for w in workers])
        return result
    finally:
        for worker in workers:
            ray.kill(worker)
        if started:
            ray.shutdown()


def _get(ray: Any, refs: list[Any]) -> list[Any]:
    """``ray.get``, with an error raised inside a worker re-raised as itself (a dataset
    made by another teacher stays a one-line DatasetError, not a Ray traceback)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(e.cause, Exception) else None
        if cause is None:
            raise
        raise cause from None


class _Planner:
    """Passes over the input, dispatching unpublished rows to the workers."""

    def __init__(
        self,
        ray: Any,
        workers: list[Any],
        context: PlanContext,
        spec: JobSpec,
        on_progress: Callable[[JobProgress], None] | None,
    ) -> None:
        self.ray = ray
        self.workers = workers
        self.context = context
        self.spec = spec
        self.on_progress = on_progress
        self.result = CaptureResult(JobProgress())
        self.alive = set(range(len(workers)))

    def run(self, path: Path | str, chunk_rows: int) -> CaptureResult:
        progress = self.result.progress
        progress.rows_total = count_rows(self.spec.input)
        published = published_keys(path)
        planned: set[str] = set()
        self._dispatch(self._first_pass(published, planned, chunk_rows))
        while True:
            self.result.passes += 1
            self._flush()
            missing = planned - published_keys(path)
            if not missing:
                return self.result
            if self.result.passes >= MAX_PASSES:
                raise RuntimeError(
                    f"{len(missing)} rows are still unpublished after {self.result.passes} "
                    "passes (workers keep dying: see the Ray logs); rerun the same command "
                    "to resume"
                )
            self.result.rows_recomputed += len(missing)
            self._dispatch(self._missing_pass(missing, chunk_rows))

    def _flush(self) -> None:
        """Every live worker publishes its pending rows; a worker that died meanwhile lost
        them, and the next pass finds them missing."""
        for i in sorted(self.alive):
            try:
                _get(self.ray, [self.workers[i].flush.remote()])
            except self.ray.exceptions.RayActorError:
                self._failed(i)

    def _failed(self, i: int) -> None:
        """Worker ``i`` is dead for good (Ray gave up restarting it)."""
        self.result.workers_lost += 1
        self.alive.discard(i)
        if not self.alive:
            raise RuntimeError(
                "every Ray worker died (see the Ray logs); rerun the same command to resume"
            )

    def _chunks(self, chunk_rows: int) -> Iterator[tuple[list[Query], list[Any], list[Any]]]:
        rows = iter_input_rows(self.spec.input)
        context = self.context
        while chunk := list(islice(rows, chunk_rows)):
            queries, kept, errors = prepare_rows(
                context.tokenizer, context.limits, self.spec, chunk
            )
            yield queries, kept, errors

    def _first_pass(
        self, published: set[str], planned: set[str], chunk_rows: int
    ) -> Iterator[tuple[list[Query], list[dict[str, Any]]]]:
        """Every row once: failed rows are reported, present ones counted, the rest sent."""
        progress = self.result.progress
        for queries, rows, errors in self._chunks(chunk_rows):
            self.result.errors += errors
            progress.rows_failed += len(errors)
            progress.rows_done += len(errors)
            todo: list[Query] = []
            metas: list[dict[str, Any]] = []
            for query, row in zip(queries, rows, strict=True):
                key = self.context.key(query)
                if key in published or key in planned:
                    progress.rows_present += 1
                    progress.rows_done += 1
                    continue
                planned.add(key)
                todo.append(query)
                metas.append(row.meta)
            if todo:
                yield todo, metas
            self._report()

    def _missing_pass(
        self, missing: set[str], chunk_rows: int
    ) -> Iterator[tuple[list[Query], list[dict[str, Any]]]]:
        """The rows of ``missing``, each once; counted already by the first pass."""
        missing = set(missing)
        for queries, rows, _ in self._chunks(chunk_rows):
            todo: list[Query] = []
            metas: list[dict[str, Any]] = []
            for query, row in zip(queries, rows, strict=True):
                key = self.context.key(query)
                if key in missing:
                    missing.discard(key)
                    todo.append(query)
                    metas.append(row.meta)
            if todo:
                yield todo, metas

    def _dispatch(self, chunks: Iterator[tuple[list[Query], list[dict[str, Any]]]]) -> None:
        inflight: dict[Any, tuple[int, int]] = {}
        queued = [0] * len(self.workers)
        for queries, metas in chunks:
            while not (free := [i for i in self.alive if queued[i] < CHUNKS_PER_WORKER]):
                self._collect(inflight, queued)
            i = min(free, key=lambda w: queued[w])
            inflight[self.workers[i].answer.remote(queries, metas)] = (i, len(queries))
            queued[i] += 1
        while inflight:
            self._collect(inflight, queued)

    def _collect(self, inflight: dict[Any, tuple[int, int]], queued: list[int]) -> None:
        """Wait for one chunk; count it, or drop its worker, dead for good (its rows come
        back in the next pass)."""
        [ref], _ = self.ray.wait(list(inflight), num_returns=1)
        i, rows = inflight.pop(ref)
        queued[i] -= 1
        try:
            [counts] = _get(self.ray, [ref])
        except self.ray.exceptions.RayActorError:
            self._failed(i)
            return
        if self.result.passes == 0:
            progress = self.result.progress
            progress.add_answered(counts)
            progress.rows_done += rows
            self._report()

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.result.progress)
