"""SGLang's ``POST /generate`` in the scoring shape axolotl sends (protocol_sglang.py).

A thin adapter over the same flow as ``/v1/completions`` (``answer_queries``: limits
named by the body's field, ``max_response_entries``, the one ``TeacherService``, the
``X-Distill-Dataset`` dataset); it sits behind the bearer token like every non-probe path.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from .backend import Query
from .deps import Ready, State, checked
from .protocol_sglang import GenerateBody
from .routes_openai import respond_json

router = APIRouter(tags=["sglang"])


@router.post("/generate")
async def generate(body: GenerateBody, rt: Ready, state: State, request: Request) -> Response:
    """SGLang's scoring of token-id sequences: every input position's top-k."""
    settings = state.settings

    def queries() -> list[Query | None]:
        return [
            checked(rt, lambda i=i: body.query(i), lambda part, i=i: body.field_name(i, part))
            for i in range(len(body.sequences()))
        ]

    made = await asyncio.to_thread(queries)
    return await respond_json(rt, settings, request, made, body.response)
