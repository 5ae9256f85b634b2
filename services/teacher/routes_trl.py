"""What TRL asks of a teacher server beyond vLLM's ``/v1``: probes, the older
``trl vllm-serve`` endpoints, and weight sync.

TRL's current client (``trl vllm-serve`` starts ``vllm serve``) checks ``GET /health``
until it answers 200, reads ``/v1/models``, and scores and generates through
``/v1/completions`` (routes_openai.py). Older TRL servers had endpoints of their own,
still called by the TRL releases and tools of that time: ``GET /health/``,
``POST /get_sequence_logprobs/`` and ``POST /generate/`` (wire models: protocol_trl.py),
served here by the same flow as ``/v1/completions`` (``answer_queries``: limits named by
the body's field, ``max_response_entries``, the one ``TeacherService``, the
``X-Distill-Dataset`` dataset). The probes answer 200 only once the teacher is loaded,
so TRL's wait covers the load; they stay open without a token, as the other probes do.

Weight sync (``init_communicator`` and the rest, old and new paths) moves a training
policy's weights into the server. A cached teacher's weights are fixed, since the cache
key pins them, so these answer 501 with the reason; they sit behind the bearer token
like every other non-probe path (gate.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from .backend import Query
from .deps import CLIENT_CLOSED, LOADING_RETRY_AFTER, ClientGone, Ready, State
from .limits import QueryError
from .protocol_openai import Wire
from .protocol_trl import GenerateBody, SequenceLogprobsBody
from .routes_openai import answer_queries, target_dataset
from .runtime import Runtime
from .settings import TeacherSettings

router = APIRouter(tags=["trl"])

# vLLM's development endpoints TRL's client calls for weight sync, and the older
# `trl vllm-serve` server's own.
WEIGHT_SYNC_PATHS = (
    "/server_info",
    "/get_world_size",
    "/init_weight_transfer_engine",
    "/start_weight_update",
    "/update_weights",
    "/finish_weight_update",
    "/reset_prefix_cache",
    "/get_world_size/",
    "/init_communicator/",
    "/update_named_param/",
    "/batch_update_named_params/",
    "/reset_prefix_cache/",
    "/close_communicator/",
)
WEIGHTS_ARE_FIXED = (
    "distillcache serves a fixed teacher: its answers are cached under its weights, so it "
    "takes no weight updates. Use it as the teacher (scoring and generation through "
    "/v1/completions) and keep the policy's generation on a vLLM server of its own."
)


@router.get("/health")
@router.get("/health/")
async def health(state: State) -> JSONResponse:
    """200 once the teacher answers (vLLM's probe, and the older TRL server's)."""
    if state.runtime is None:
        body = {"status": "failed" if state.load_error else "loading"}
        return JSONResponse(body, 503, headers={"Retry-After": str(LOADING_RETRY_AFTER)})
    return JSONResponse({"status": "ok"})


async def weights_are_fixed() -> JSONResponse:
    return JSONResponse({"detail": WEIGHTS_ARE_FIXED}, 501)


for _path in WEIGHT_SYNC_PATHS:
    for _method in ("GET", "POST"):  # one route per method: OpenAPI ids are per route
        router.add_api_route(_path, weights_are_fixed, methods=[_method])


@router.post("/get_sequence_logprobs/")
async def get_sequence_logprobs(
    body: SequenceLogprobsBody, rt: Ready, state: State, request: Request
) -> Response:
    """The older TRL server's scoring of whole sequences from their prompt lengths on."""
    queries = await asyncio.to_thread(
        _checked, rt, [body.query(i) for i in range(len(body.sequences))], body.field_name
    )
    return await _respond(rt, state.settings, request, queries, body.response)


@router.post("/generate/")
async def generate(body: GenerateBody, rt: Ready, state: State, request: Request) -> Response:
    """The older TRL server's generation, with the top ``logprobs`` per token."""
    tokenizer, chars = rt.backend.tokenizer, state.settings.max_prompt_chars

    def queries() -> list[Query]:
        made = []
        for i in range(len(body.prompts)):
            try:
                made.append(body.query(i, tokenizer, chars))
            except QueryError as e:
                raise QueryError(body.field_name(i, e.field), e.message) from None
        return _checked(rt, made, body.field_name)

    return await _respond(
        rt, state.settings, request, await asyncio.to_thread(queries), body.response
    )


def _checked(
    rt: Runtime, queries: list[Query | None], field_name: Callable[[int, str], str]
) -> list[Query | None]:
    """``queries`` within the teacher's limits; errors name the body's field."""
    for i, query in enumerate(queries):
        if query is not None:
            try:
                rt.service.limits.check(query)
            except QueryError as e:
                raise QueryError(field_name(i, e.field), e.message) from None
    return queries


async def _respond(
    rt: Runtime,
    settings: TeacherSettings,
    request: Request,
    queries: list[Query | None],
    shape: Callable[..., dict],
) -> Response:
    """Answer the queries (None: nothing to ask) and encode ``shape``'s answer off the loop."""
    asked = [q for q in queries if q is not None]
    dataset = target_dataset(request, settings.dropin_dataset)
    try:
        got = iter(await answer_queries(rt, request, asked, settings.max_response_entries, dataset))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    answers = [next(got) if q is not None else None for q in queries]
    wire = Wire(settings.logprob_codec, settings.logprobs_mode, rt.backend.tokenizer)

    def encode() -> bytes:
        return json.dumps(shape(answers, wire)).encode()

    return Response(await asyncio.to_thread(encode), media_type="application/json")
