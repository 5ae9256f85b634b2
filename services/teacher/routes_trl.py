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

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from .backend import Query
from .deps import LOADING_RETRY_AFTER, Ready, State, checked
from .protocol_trl import GenerateBody, SequenceLogprobsBody
from .routes_openai import respond_json

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

    def queries() -> list[Query | None]:
        return [
            checked(rt, lambda i=i: body.query(i), lambda part, i=i: body.field_name(i, part))
            for i in range(len(body.sequences))
        ]

    made = await asyncio.to_thread(queries)
    return await respond_json(rt, state.settings, request, made, body.response)


@router.post("/generate/")
async def generate(body: GenerateBody, rt: Ready, state: State, request: Request) -> Response:
    """The older TRL server's generation, with the top ``logprobs`` per token."""
    tokenizer, chars = rt.backend.tokenizer, state.settings.max_prompt_chars

    def queries() -> list[Query | None]:
        return [
            checked(
                rt,
                lambda i=i: body.query(i, tokenizer, chars),
                lambda part, i=i: body.field_name(i, part),
            )
            for i in range(len(body.prompts))
        ]

    made = await asyncio.to_thread(queries)
    return await respond_json(rt, state.settings, request, made, body.response)
