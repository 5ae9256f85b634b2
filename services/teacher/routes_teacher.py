"""``POST /v1/generate`` and ``POST /v1/score``: the teacher's answers, cached or fresh.

Bodies become queries off the event loop (tokenising a long prompt must not stall other
requests; texts longer than ``max_prompt_chars`` are refused before tokenising), pass
the teacher's limits, and must fit ``max_response_entries`` (positions x k) before the
teacher runs. The answer is encoded off the event loop too (JSON, or Arrow IPC when the
client's Accept header asks for it: answer_arrow.py), and a request whose client
disconnects is cancelled, freeing its place in the queue.

``score_ids`` need a backend that computes them (``backend.score_ids``); others answer
400 naming the backend, before anything runs. A body naming a ``dataset`` gets it opened
(created when new) and every answer stored in it with its pair's ``meta``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import APIRouter, HTTPException, Request, Response, status

from .answer_arrow import ARROW_STREAM, encode_answers, wants_arrow
from .backend import Query
from .deps import (
    CLIENT_CLOSED,
    ClientGone,
    Ready,
    State,
    check_answer_size,
    checked,
    unless_disconnected,
)
from .protocol import AnswerResponse, GenerateBody, ScoreBody, ScoreResponse
from .runtime import Runtime
from .settings import TeacherSettings

router = APIRouter(prefix="/v1", tags=["teacher"])


@router.post("/generate", response_model=AnswerResponse)
async def generate(body: GenerateBody, rt: Ready, state: State, request: Request) -> Response:
    """Generate a completion with the teacher's top-k log-probs at every position."""
    settings = state.settings
    tokenizer, chars = rt.backend.tokenizer, settings.max_prompt_chars

    def query() -> Query:
        return checked(
            rt, lambda: body.to_query(tokenizer, settings.default_k, chars), body.field_name
        )

    queries = [await asyncio.to_thread(query)]
    return await _answer(rt, settings, request, queries, body.cache, _one_answer, None, None)


@router.post("/score", response_model=ScoreResponse)
async def score(body: ScoreBody, rt: Ready, state: State, request: Request) -> Response:
    """Score (prompt, completion) pairs by teacher forcing."""
    settings = state.settings
    tokenizer, chars = rt.backend.tokenizer, settings.max_prompt_chars
    k = body.k or settings.default_k

    def queries() -> list[Query]:
        return [
            checked(
                rt,
                lambda pair=pair: pair.to_query(tokenizer, k, chars),
                lambda part, i=i: body.field_name(i, part),
            )
            for i, pair in enumerate(body.pairs)
        ]

    if any(pair.score_ids for pair in body.pairs) and not rt.backend.score_ids:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"score_ids: the {rt.backend.name} backend cannot return log-probs at named ids "
            "for prompt positions; leave score_ids out (the teacher's top-k only)",
        )
    if body.dataset is not None:
        if body.cache != "read-write":
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"dataset: answers are stored with cache read-write, not {body.cache!r}",
            )
        try:
            await asyncio.to_thread(rt.store.open_dataset, body.dataset, k, None)
        except ValueError as e:  # DatasetError is one
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"dataset: {e}") from None
    metas = [pair.meta or {} for pair in body.pairs]
    return await _answer(
        rt,
        settings,
        request,
        await asyncio.to_thread(queries),
        body.cache,
        _score_answers,
        body.dataset,
        metas,
    )


def _one_answer(answers: list[AnswerResponse]) -> AnswerResponse:
    return answers[0]


def _score_answers(answers: list[AnswerResponse]) -> ScoreResponse:
    return ScoreResponse(results=answers)


async def _answer(
    rt: Runtime,
    settings: TeacherSettings,
    request: Request,
    queries: list[Query],
    cache: str,
    shape: Callable[[list[AnswerResponse]], AnswerResponse | ScoreResponse],
    dataset: str | None,
    metas: list[dict] | None,
) -> Response:
    check_answer_size(queries, settings.max_response_entries)
    try:
        answers = await unless_disconnected(
            request, rt.service.answer(queries, cache=cache, dataset=dataset, metas=metas)
        )
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    codec = rt.store.codec
    if wants_arrow(request.headers.get("accept")):
        info = rt.store.dataset_info(queries[0].k, None)
        body = await asyncio.to_thread(encode_answers, answers, info)
        return Response(body, media_type=ARROW_STREAM)

    def encode() -> bytes:
        return shape([AnswerResponse.of(a, codec) for a in answers]).model_dump_json().encode()

    return Response(await asyncio.to_thread(encode), media_type="application/json")
