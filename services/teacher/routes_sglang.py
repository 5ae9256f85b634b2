"""SGLang's ``POST /generate`` in the scoring shape axolotl sends (protocol_sglang.py).

A thin adapter over the same flow as ``/v1/completions`` (``answer_queries``: limits
named by the body's field, ``max_response_entries``, the one ``TeacherService``, the
``X-Distill-Dataset`` dataset); it sits behind the bearer token like every non-probe path.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request, Response

from .deps import CLIENT_CLOSED, ClientGone, Ready, State
from .limits import QueryError
from .protocol_openai import Wire
from .protocol_sglang import GenerateBody
from .routes_openai import answer_queries, target_dataset

router = APIRouter(tags=["sglang"])


@router.post("/generate")
async def generate(body: GenerateBody, rt: Ready, state: State, request: Request) -> Response:
    """SGLang's scoring of token-id sequences: every input position's top-k."""
    settings = state.settings

    def queries():
        made = [body.query(i) for i in range(len(body.sequences()))]
        for i, query in enumerate(made):
            if query is not None:
                try:
                    rt.service.limits.check(query)
                except QueryError as e:
                    raise QueryError(body.field_name(i, e.field), e.message) from None
        return made

    made = await asyncio.to_thread(queries)
    asked = [q for q in made if q is not None]
    dataset = target_dataset(request, settings.dropin_dataset)
    try:
        got = iter(await answer_queries(rt, request, asked, settings.max_response_entries, dataset))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    answers = [next(got) if q is not None else None for q in made]
    wire = Wire(settings.logprob_codec, settings.logprobs_mode, rt.backend.tokenizer)

    def encode() -> bytes:
        return json.dumps(body.response(answers, wire)).encode()

    return Response(await asyncio.to_thread(encode), media_type="application/json")
