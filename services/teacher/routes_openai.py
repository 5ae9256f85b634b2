"""``POST /v1/completions`` and ``GET /v1/models``: vLLM's OpenAI-compatible API over the cache.

A thin adapter (wire models and conversion: protocol_openai.py) over the one
``TeacherService``: the body's prompts become queries off the event loop, pass the
teacher's limits with errors naming the body's field, must fit ``max_response_entries``,
and are answered by ``TeacherService.answer`` (same keys, cache, batching and metrics as
``/v1/score``); the answer is encoded off the loop, and a client that disconnects
cancels its work.

``answer_queries`` and ``target_dataset`` are this flow for every foreign protocol
(routes_trl.py uses them too).

Where answers are stored. By default in the live dataset of their k, as ``/v1/score``'s.
With a dataset named by the ``X-Distill-Dataset`` header or the ``dropin_dataset``
setting, in ``<name>-k<k>`` instead (a dataset holds one k; a request asking for
prompt log-probs and generation log-probs of different k writes two), cached answers
included, so an online distillation run leaves its teacher's answers behind as shards.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from fastapi import APIRouter, HTTPException, Request, Response, status

from distillcache.shared.manifest import DatasetError

from .backend import Query
from .deps import (
    CLIENT_CLOSED,
    ClientGone,
    Ready,
    State,
    check_answer_size,
    dataset_name,
    unless_disconnected,
)
from .limits import QueryError
from .protocol_openai import CompletionBody, Plan, Wire, completion_response, models_response
from .runtime import Runtime
from .settings import TeacherSettings
from .store import Answer

router = APIRouter(prefix="/v1", tags=["openai"])

DATASET_HEADER = "X-Distill-Dataset"
_STARTED = int(time.time())


def served_model(rt: Runtime, configured: str | None) -> str:
    """The model name clients use: the ``served_model_name`` setting, else the teacher's id."""
    return configured or rt.backend.model_id


@router.get("/models")
async def models(rt: Ready, state: State) -> dict:
    """The one teacher this server answers for, as vLLM lists it."""
    name = served_model(rt, state.settings.served_model_name)
    return models_response(name, rt.backend.model_id, rt.backend.max_model_len, _STARTED)


@router.post("/completions")
async def completions(body: CompletionBody, rt: Ready, state: State, request: Request) -> Response:
    """vLLM's completions: generation with ``logprobs``, prompt scoring with
    ``prompt_logprobs`` and ``echo``; token-id or text prompts, one or a batch."""
    settings = state.settings
    model = served_model(rt, settings.served_model_name)
    if body.model is not None and body.model != model:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"model: {body.model!r} is not served here; use {model!r}"
        )
    name = target_dataset(request, settings.dropin_dataset)
    tokenizer = rt.backend.tokenizer

    def plans() -> list[Plan]:
        out = []
        for i, prompt in enumerate(body.prompts()):
            try:
                plan = body.plan(i, prompt, tokenizer, settings.max_prompt_chars)
                # Echoed even when nothing is asked of the teacher (max_tokens 0).
                rt.service.limits.check_ids("prompt", plan.prompt_ids)
                for query in plan.queries():
                    rt.service.limits.check(query)
            except QueryError as e:
                raise QueryError(body.field_name(i, e.field), e.message) from None
            out.append(plan)
        return out

    planned = await asyncio.to_thread(plans)
    queries = [q for plan in planned for q in plan.queries()]
    try:
        answers = await answer_queries(rt, request, queries, settings.max_response_entries, name)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    wire = Wire(rt.store.codec, settings.logprobs_mode, tokenizer)

    def encode() -> bytes:
        return json.dumps(completion_response(body, planned, answers, model, wire)).encode()

    return Response(await asyncio.to_thread(encode), media_type="application/json")


def target_dataset(request: Request, configured: str | None) -> str | None:
    """The dataset a foreign protocol's answers go to: the header's, else the setting's."""
    name = request.headers.get(DATASET_HEADER) or configured
    return None if name is None else dataset_name(name, DATASET_HEADER)


async def answer_queries(
    rt: Runtime, request: Request, queries: list[Query], max_entries: int, dataset: str | None
) -> list[Answer]:
    """The service's answers to ``queries`` (checked), in order, for a foreign protocol's
    route: 413 beyond ``max_entries`` log-probs before the teacher runs, ClientGone once
    the client has left."""
    check_answer_size(queries, max_entries)
    return await unless_disconnected(request, _answer(rt, queries, dataset))


async def _answer(rt: Runtime, queries: list[Query], dataset: str | None) -> list[Answer]:
    """With ``dataset``, answers are stored in ``<dataset>-k<k>`` per k (one ``answer``
    call each, since a dataset holds one k)."""
    if dataset is None:
        return await rt.service.answer(queries)
    by_k: dict[int, list[int]] = {}
    for i, q in enumerate(queries):
        by_k.setdefault(q.k, []).append(i)
    answers: list[Answer | None] = [None] * len(queries)
    for k, where in by_k.items():
        target = f"{dataset}-k{k}"
        try:
            await asyncio.to_thread(rt.store.open_dataset, target, k, None)
        except (ValueError, DatasetError) as e:  # another k, teacher or codec is there
            raise HTTPException(status.HTTP_409_CONFLICT, f"{DATASET_HEADER}: {e}") from None
        got = await rt.service.answer([queries[i] for i in where], dataset=target)
        for i, a in zip(where, got, strict=True):
            answers[i] = a
    return answers  # type: ignore[return-value]


async def respond_json(
    rt: Runtime,
    settings: TeacherSettings,
    request: Request,
    queries: list[Query | None],
    shape: Callable[..., dict],
) -> Response:
    """A foreign protocol's JSON answer: the queries answered (None: nothing to ask;
    ``answer_queries``), ``shape``'s response encoded off the event loop."""
    asked = [q for q in queries if q is not None]
    dataset = target_dataset(request, settings.dropin_dataset)
    try:
        got = iter(await answer_queries(rt, request, asked, settings.max_response_entries, dataset))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    answers = [next(got) if q is not None else None for q in queries]
    wire = Wire(rt.store.codec, settings.logprobs_mode, rt.backend.tokenizer)

    def encode() -> bytes:
        return json.dumps(shape(answers, wire)).encode()

    return Response(await asyncio.to_thread(encode), media_type="application/json")
