"""``POST /v1/generate`` and ``POST /v1/score``: the teacher's answers, cached or fresh.

Bodies become queries off the event loop (tokenising a long prompt must not stall other
requests), pass the teacher's limits, and go through ``TeacherService.answer``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import APIRouter, Depends

from .backend import Query
from .deps import Ready, State, authorized
from .limits import QueryError
from .protocol import AnswerResponse, GenerateBody, ScoreBody, ScoreResponse
from .runtime import Runtime

router = APIRouter(prefix="/v1", tags=["teacher"], dependencies=[Depends(authorized)])


@router.post("/generate", response_model=AnswerResponse)
async def generate(body: GenerateBody, rt: Ready, state: State) -> AnswerResponse:
    """Generate a completion with the teacher's top-k log-probs at every position."""
    tokenizer, k = rt.backend.tokenizer, state.settings.default_k
    query = await asyncio.to_thread(
        _checked, rt, lambda: body.to_query(tokenizer, k), body.field_name
    )
    [answer] = await rt.service.answer([query], store=body.store)
    return AnswerResponse.of(answer, state.settings.logprob_codec)


@router.post("/score", response_model=ScoreResponse)
async def score(body: ScoreBody, rt: Ready, state: State) -> ScoreResponse:
    """Score (prompt, completion) pairs by teacher forcing."""
    tokenizer, k = rt.backend.tokenizer, body.k or state.settings.default_k

    def queries() -> list[Query]:
        return [
            _checked(
                rt,
                lambda pair=pair: pair.to_query(tokenizer, k),
                lambda part, i=i: body.field_name(i, part),
            )
            for i, pair in enumerate(body.pairs)
        ]

    answers = await rt.service.answer(await asyncio.to_thread(queries), store=body.store)
    codec = state.settings.logprob_codec
    return ScoreResponse(results=[AnswerResponse.of(a, codec) for a in answers])


def _checked(rt: Runtime, make: Callable[[], Query], field_name: Callable[[str], str]) -> Query:
    """The query ``make`` builds, within the teacher's limits; errors name the body's field."""
    try:
        query = make()
        rt.service.limits.check(query)
    except QueryError as e:
        raise QueryError(field_name(e.field), e.message) from None
    return query
