"""``/healthz`` (the process answers), ``/readyz`` (the model is loaded) and ``/metrics``:
open without a token, for orchestrators and scrapers."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .deps import LOADING_RETRY_AFTER, State

router = APIRouter(tags=["probes"])


@router.get("/healthz")
async def healthz(state: State) -> JSONResponse:
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "error": state.load_error}, 503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    rt = state.runtime
    if rt is None:
        body = (
            {"status": "failed", "error": state.load_error}
            if state.load_error
            else {"status": "loading"}
        )
        return JSONResponse(body, 503, headers={"Retry-After": str(LOADING_RETRY_AFTER)})
    identity = rt.store.identity
    # The tokenizer fields let a client (the trainer's on-policy steps) check that its ids
    # mean the teacher's tokens before it loads anything.
    return JSONResponse(
        {
            "status": "ready",
            "model": rt.backend.model_id,
            "backend": rt.backend.name,
            "max_k": rt.service.max_k,
            "max_model_len": rt.backend.max_model_len,
            "tokenizer": identity.tokenizer,
            "tokenizer_hash": identity.tokenizer_hash,
            "vocab_size": identity.vocab_size,
        }
    )


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
