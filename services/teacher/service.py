"""Cache or teacher: the one path every answer takes, for HTTP requests and batch jobs alike.

A ``Query`` (backend.py) is one question to the teacher in token ids.
``TeacherService.answer`` keys each query, answers what the store holds from the shards
(the teacher does not run), coalesces identical queries already running, sends the rest
to the batcher, and stores the new answers. Sharing this path is what makes a batch job's rows and a live
request's answers interchangeable in the cache.

``score_ids`` (a score query's extra ids, answered with their exact log-probs) are not
columns of the shard schema. A record made for a query with score_ids keeps them in its
``meta`` under ``SCORE_META`` (the ids and their float32 log-probs, which JSON carries
exactly), wherever it is stored. A stored row answers a query with score_ids only when
its ``SCORE_META`` holds exactly those ids: so a hit returns numbers as exact as asked,
and the key needs no change (it still covers the top-k part, which is the same with or
without score_ids). A query with score_ids never joins another request's flight (that
flight may not compute its ids). An on-policy run that repeats a step after a resume
therefore gets its samples from its own dataset, and the teacher does not run again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from distillcache.shared.manifest import DatasetError
from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import SampledLogits

from .backend import Query, TeacherBackend, TeacherOutput
from .batcher import Batcher
from .limits import Limits
from .metrics import ServiceMetrics
from .store import Answer, TeacherStore

log = logging.getLogger(__name__)

CacheMode = Literal["read-write", "read", "bypass"]
# The meta key of a record's score_ids and their log-probs (module docstring).
SCORE_META = "_score_ids"


@dataclasses.dataclass
class ScoredAnswer(Answer):
    """An answer with the log-probs at its query's ``score_ids`` (None: none asked)."""

    score_logprobs: list[np.ndarray] | None = None


# What a flight resolves to: the record, and the log-probs at score_ids if asked.
_Fresh = tuple[SequenceRecord, "list[np.ndarray] | None"]


class TeacherService:
    def __init__(
        self,
        backend: TeacherBackend,
        store: TeacherStore,
        batcher: Batcher,
        metrics: ServiceMetrics,
        *,
        max_k: int,
    ) -> None:
        self.backend = backend
        self.store = store
        self.batcher = batcher
        self.metrics = metrics
        self.max_k = min(max_k, backend.max_k)
        self.limits = Limits(self.max_k, backend.vocab_size, backend.max_model_len)
        self._flights: dict[str, asyncio.Future[_Fresh]] = {}

    def key(self, query: Query) -> str:
        """The cache key of ``query`` as this service answers it (in the store's mode)."""
        return self.store.identity.key(query.in_mode(self.store.sampled))

    async def answer(
        self,
        queries: Sequence[Query],
        *,
        cache: CacheMode = "read-write",
        dataset: str | None = None,
        metas: Sequence[dict[str, Any]] | None = None,
        queue: bool = True,
    ) -> list[Answer]:
        """Answer ``queries`` (checked already), from the store where ``cache`` allows.

        ``cache``: "read-write" answers from the store and stores new answers in the live
        dataset of their k; "read" answers from the store and stores nothing; "bypass"
        runs the teacher for every query (a fresh draw for unseeded sampling) and stores
        nothing. A batch job names its ``dataset`` instead, which then receives every
        answer, cached ones included, with the job's ``metas``. ``queue`` False (batch
        jobs) bypasses the HTTP queue, which would refuse with QueueFull when full.
        """
        if dataset is not None and cache != "read-write":
            raise ValueError(f"a dataset is written in read-write mode, not {cache!r}")
        metas = list(metas) if metas is not None else [{} for _ in queries]
        queries = [q.in_mode(self.store.sampled) for q in queries]
        keys = [self.key(q) for q in queries]
        if self.store.sampled is not None:
            # A row's draws are seeded by its key, so recomputing it gives the same draws.
            queries = [
                dataclasses.replace(q, draw_seed=SampledLogits.seed_for(key))
                for q, key in zip(queries, keys, strict=True)
            ]
        # Queries with score_ids share their record's key but not their answer (module doc).
        flight_keys = [k + _score_ids_suffix(q) for k, q in zip(keys, queries, strict=True)]
        hits: dict[str, Answer] = {}
        if cache != "bypass":
            stored = await asyncio.to_thread(self.store.lookup, keys)
            for key, flight_key, query in zip(keys, flight_keys, queries, strict=True):
                hit = _hit(stored.get(key), query)
                if hit is not None:
                    hits[flight_key] = hit
            self.metrics.cache_lookups.labels("hit").inc(len(hits))
            self.metrics.cache_lookups.labels("miss").inc(len(set(flight_keys)) - len(hits))

        answers: dict[int, Answer] = {}
        mine: dict[str, int] = {}
        own: dict[str, asyncio.Future[_Fresh]] = {}
        theirs: dict[int, asyncio.Future[_Fresh]] = {}
        for i, key in enumerate(flight_keys):
            if key in hits:
                answers[i] = hits[key]
            elif key in own:
                theirs[i] = own[key]
            elif key in self._flights and cache != "bypass":
                theirs[i] = self._flights[key]
            else:
                mine[key] = i
                own[key] = asyncio.get_running_loop().create_future()
                if cache != "bypass" and not queries[i].score_ids:
                    self._flights[key] = own[key]

        try:
            await self._run_teacher(queries, keys, metas, mine, own, answers, queue)
            for i, flight in theirs.items():
                record, scores = await flight
                answers[i] = ScoredAnswer(record, True, None, scores)
            ordered = [answers[i] for i in range(len(queries))]
            for a in ordered:
                a.record = self.store.shape(a.record)
            self.metrics.cache_tokens.inc(
                sum(
                    len(a.record.prompt_ids) + len(a.record.completion_ids)
                    for a in ordered
                    if a.cached
                )
            )
            if dataset is not None:
                rows = [_with_meta(a.record, m) for a, m in zip(ordered, metas, strict=True)]
                await asyncio.to_thread(self.store.put, dataset, rows)
                for a in ordered:
                    a.dataset = dataset
            elif cache == "read-write":
                await self._store_live(ordered)
        finally:
            # Only now, with the answers stored, may an identical query miss the flight.
            for key, flight in own.items():
                if self._flights.get(key) is flight:
                    del self._flights[key]
        return ordered

    async def _run_teacher(
        self,
        queries: Sequence[Query],
        keys: list[str],
        metas: list[dict[str, Any]],
        mine: dict[str, int],
        own: dict[str, asyncio.Future[_Fresh]],
        answers: dict[int, Answer],
        queue: bool,
    ) -> None:
        """Run the queries this call owns through the batcher, resolving their flights."""
        try:
            for mode in ("generate", "score"):
                run = [i for i in mine.values() if queries[i].mode == mode]
                if not run:
                    continue
                call = self.batcher.submit if queue else self.batcher.run
                outputs = await call(mode, [queries[i] for i in run])
                for i, out in zip(run, outputs, strict=True):
                    record = _record(keys[i], queries[i], out, metas[i])
                    answers[i] = ScoredAnswer(record, False, None, out.score_logprobs)
                    own[keys[i] + _score_ids_suffix(queries[i])].set_result(
                        (record, out.score_logprobs)
                    )
        except BaseException as e:
            for flight in own.values():
                if not flight.done():
                    flight.set_exception(
                        e if isinstance(e, Exception) else RuntimeError("cancelled")
                    )
                    # Nobody else may be waiting on it: mark the exception as retrieved.
                    flight.exception()
            raise

    async def _store_live(self, answers: list[Answer]) -> None:
        by_k: dict[int, list[Answer]] = {}
        for a in answers:
            if a.dataset is None:
                by_k.setdefault(a.record.topk_ids.shape[1], []).append(a)
        for k, group in by_k.items():
            try:
                name = await asyncio.to_thread(self.store.open_live_dataset, k)
                await asyncio.to_thread(self.store.put, name, [a.record for a in group])
            except (DatasetError, OSError) as e:
                # The teacher's answers are right; only keeping them failed (a damaged or
                # full dataset). Answer them unstored (dataset null) rather than discard them.
                log.error("could not store %d answers of k=%d: %s", len(group), k, e)
                self.metrics.store_failures.inc(len(group))
                continue
            for a in group:
                a.dataset = name


def _hit(stored: Answer | None, query: Query) -> Answer | None:
    """A stored answer that answers ``query`` exactly: any, without score_ids; with them,
    one whose record holds the log-probs at exactly those ids."""
    if stored is None or not query.score_ids:
        return stored
    scores = stored.record.meta.get(SCORE_META)
    if scores is None or scores["ids"] != [list(ids) for ids in query.score_ids]:
        return None
    values = [np.asarray(row, dtype=np.float32) for row in scores["logprobs"]]
    return ScoredAnswer(stored.record, True, stored.dataset, values)


def _score_ids_suffix(query: Query) -> str:
    """Distinguishes, within one call, queries that differ only in their score_ids."""
    if not query.score_ids:
        return ""
    digest = hashlib.sha256(json.dumps(query.score_ids).encode()).hexdigest()[:16]
    return f"+score_ids:{digest}"


def _record(key: str, query: Query, out: TeacherOutput, meta: dict[str, Any]) -> SequenceRecord:
    if query.score_ids:
        scores = {
            "ids": [list(ids) for ids in query.score_ids],
            "logprobs": [row.astype(np.float32).tolist() for row in out.score_logprobs or []],
        }
        meta = {**meta, SCORE_META: scores}
    return SequenceRecord(
        key=key,
        prompt_ids=out.prompt_ids,
        completion_ids=out.completion_ids,
        topk_ids=out.topk_ids,
        topk_logprobs=out.topk_logprobs,
        token_logprob=out.token_logprob,
        tail_logprob=out.tail_logprob,
        completion_text=out.completion_text,
        logprob_start=out.logprob_start,
        finish_reason=out.finish_reason,
        request=query.request_json(),
        meta=meta,
    )


def _with_meta(record: SequenceRecord, meta: dict[str, Any]) -> SequenceRecord:
    """The record with a job's or request's meta; its score_ids values stay with it."""
    if SCORE_META in record.meta:
        meta = {**meta, SCORE_META: record.meta[SCORE_META]}
    return record if record.meta == meta else dataclasses.replace(record, meta=meta)
