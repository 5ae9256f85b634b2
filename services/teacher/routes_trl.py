"""What TRL's ``VLLMClient`` asks of a vLLM server beyond ``/v1``: its probe and weight sync.

TRL (``trl vllm-serve`` starts ``vllm serve``) checks ``GET /health`` until it answers
200, reads ``/v1/models``, and scores and generates through ``/v1/completions``
(routes_openai.py). ``/health`` answers 200 only once the teacher is loaded, so TRL's
wait covers the load; it stays open without a token, as the other probes do.

Weight sync (``init_communicator`` and the rest, old and new paths) moves a training
policy's weights into the server. A cached teacher's weights are fixed, since the cache
key pins them, so these answer 501 with the reason; they sit behind the bearer token
like every other non-probe path (gate.py).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from .deps import LOADING_RETRY_AFTER, State

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
async def health(state: State) -> JSONResponse:
    """200 once the teacher answers (vLLM's probe, which TRL's client waits on)."""
    if state.runtime is None:
        body = {"status": "failed" if state.load_error else "loading"}
        return JSONResponse(body, 503, headers={"Retry-After": str(LOADING_RETRY_AFTER)})
    return JSONResponse({"status": "ok"})


async def weights_are_fixed() -> JSONResponse:
    return JSONResponse({"detail": WEIGHTS_ARE_FIXED}, 501)


for _path in WEIGHT_SYNC_PATHS:
    for _method in ("GET", "POST"):  # one route per method: OpenAPI ids are per route
        router.add_api_route(_path, weights_are_fixed, methods=[_method])
