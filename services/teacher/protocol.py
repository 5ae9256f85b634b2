"""The HTTP wire models: what clients send and get back, each converting itself.

Bodies turn into the service's own objects (``GenerateBody.to_query``,
``ScorePair.to_query``, ``JobCreate.to_spec``) and answers are built from them
(``AnswerResponse.of``), so routes stay thin. Every body refuses unknown fields, and
the sampling fields are the ``Sampling`` model itself (shared/schema.py), with its ranges:
a temperature, top_p or seed the backends cannot take is a 422 naming the field.

A body's prompt is checked by the same rules as a batch job's rows (shared/inputs.py),
and the limits that depend on the loaded teacher (limits.py) name the body's own field:
``QueryError.field`` is mapped once, by ``field_name``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillcache.shared.codec import decode_logprobs, encode_logprobs
from distillcache.shared.inputs import (
    ROLES,
    InputProblem,
    check_messages,
    check_text,
    render_completion,
    render_prompt,
    user_turn,
)
from distillcache.shared.manifest import Manifest
from distillcache.shared.reader import PAD_ID
from distillcache.shared.schema import DatasetInfo, LogprobCodec, Sampling

from .backend import Query
from .jobs import JobSpec
from .limits import QueryError
from .service import SCORE_META, CacheMode
from .store import Answer

PROMPT_FIELDS = ("prompt", "messages", "prompt_ids")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Strict):
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str


class PromptFields(_Strict):
    """Exactly one of: ``prompt`` (text, one user turn), ``messages`` (a chat) or
    ``prompt_ids`` (token ids used as they are). Text and chats go through the teacher
    tokenizer's chat template, as batch job rows do."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    prompt_ids: list[int] | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> Any:
        given = [f for f in PROMPT_FIELDS if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of prompt, messages, prompt_ids (got {', '.join(given) or 'none'})"
            )
        return self

    def prompt_field(self) -> str:
        return next(f for f in PROMPT_FIELDS if getattr(self, f) is not None)

    def prompt_token_ids(self, tokenizer: Any, max_chars: int) -> tuple[int, ...]:
        """Ids as given; text and chats checked by the rules of a job's rows (and at most
        ``max_chars`` characters, counted before tokenising), rendered."""
        if self.prompt_ids is not None:
            return tuple(self.prompt_ids)
        chars = (
            len(self.prompt)
            if self.prompt is not None
            else sum(len(m.content) for m in self.messages or [])
        )
        if chars > max_chars:
            raise QueryError(self.prompt_field(), _too_long(chars, max_chars))
        try:
            if self.prompt is not None:
                messages = user_turn(check_text(self.prompt, "prompt"))
            else:
                messages = check_messages([m.model_dump() for m in self.messages or []])
        except InputProblem as e:
            raise QueryError(self.prompt_field(), str(e)) from None
        return tuple(render_prompt(tokenizer, messages))


CACHE_HELP = (
    "read-write: answer from the cache, store new answers; read: answer from the cache, "
    "store nothing; bypass: always run the teacher (a fresh draw for unseeded sampling), "
    "store nothing."
)


class GenerateBody(PromptFields, Sampling):
    k: int | None = Field(None, ge=1, description="Top-k to return (default: the server's).")
    cache: CacheMode = Field("read-write", description=CACHE_HELP)

    def to_query(self, tokenizer: Any, default_k: int, max_chars: int) -> Query:
        prompt = self.prompt_token_ids(tokenizer, max_chars)
        return Query("generate", prompt, self.k or default_k, sampling=self.as_sampling())

    def field_name(self, part: str) -> str:
        """The body's field for a generic query part named by a QueryError."""
        return self.prompt_field() if part == "prompt" else part


class ScorePair(PromptFields):
    """A prompt and the completion to score: ``completion`` (text; the tokenizer's eos is
    appended, as for job rows) or ``completion_ids`` (used as they are)."""

    completion: str | None = None
    completion_ids: list[int] | None = None
    logprob_start: int | None = Field(
        None, ge=1, description="First scored position (default: the first completion token)."
    )
    score_ids: list[list[int]] | None = Field(
        None,
        description="Per scored position, extra token ids whose exact teacher log-probs the "
        "answer carries as score_logprobs (the teacher always runs for these; see the docs).",
    )
    meta: dict[str, Any] | None = Field(
        None, description="Stored with the row in the body's dataset (e.g. step and seed)."
    )

    @model_validator(mode="after")
    def _one_completion(self) -> Any:
        if (self.completion is None) == (self.completion_ids is None):
            raise ValueError("give exactly one of completion, completion_ids")
        if self.meta is not None and SCORE_META in self.meta:
            raise ValueError(f"meta: the key {SCORE_META!r} is the service's own (score_ids)")
        return self

    def to_query(self, tokenizer: Any, k: int, max_chars: int) -> Query:
        prompt = self.prompt_token_ids(tokenizer, max_chars)
        if self.completion_ids is not None:
            completion = tuple(self.completion_ids)
        elif len(self.completion) > max_chars:
            raise QueryError("completion", _too_long(len(self.completion), max_chars))
        else:
            try:
                text = check_text(self.completion, "completion")
                completion = tuple(render_completion(tokenizer, text))
            except ValueError as e:
                raise QueryError("completion", str(e)) from None
        return Query(
            "score",
            prompt,
            k,
            completion_ids=completion,
            logprob_start=self.logprob_start,
            score_ids=tuple(tuple(ids) for ids in self.score_ids or ()),
        )

    def field_name(self, part: str) -> str:
        if part == "prompt":
            return self.prompt_field()
        if part == "completion":
            return "completion" if self.completion is not None else "completion_ids"
        return part


class ScoreBody(_Strict):
    pairs: list[ScorePair] = Field(min_length=1, max_length=256)
    k: int | None = Field(None, ge=1)
    cache: CacheMode = Field("read-write", description=CACHE_HELP)
    dataset: str | None = Field(
        None,
        description="Store every answer (cached ones too) as a row of this dataset, with "
        "its pair's meta; created when new. Needs cache read-write.",
    )

    def field_name(self, i: int, part: str) -> str:
        """The body's field for a part of pair ``i``'s query named by a QueryError."""
        return part if part == "k" else f"pairs.{i}.{self.pairs[i].field_name(part)}"


class AnswerResponse(BaseModel):
    """One sequence. Position j of the per-position arrays is the teacher's distribution
    over token ``logprob_start + j`` of ``prompt_ids + completion_ids``; its top-k are
    listed most likely first (with adaptive k, only the entries the rule kept)."""

    key: str
    cached: bool = Field(description="Answered from the store; the teacher did not run.")
    dataset: str | None = Field(description="Dataset holding the answer (None: not stored).")
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_text: str | None
    finish_reason: str | None
    logprob_start: int
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    token_logprob: list[float | None]
    tail_logprob: list[float | None] = Field(
        description="log of the mass outside the top-k; null when the top-k holds all of it."
    )
    score_logprobs: list[list[float | None]] | None = Field(
        None, description="Per scored position, the log-probs at the pair's score_ids, in order."
    )

    @classmethod
    def of(cls, answer: Answer, codec: LogprobCodec) -> AnswerResponse:
        """An answer as the API returns it: through the store's codec, so a fresh answer
        reads as its cached copy will; most likely first; -inf as null (JSON has none)."""
        r = answer.record
        # Adaptive k's padding (id -1) is no entry: sorted last whatever its value (a
        # one-byte codec turns its -inf into a number), then cut off.
        padded = r.topk_ids == PAD_ID
        lps = decode_logprobs(encode_logprobs(r.topk_logprobs, codec), codec)
        order = np.lexsort((r.topk_ids, -lps, padded), axis=-1)
        ids = np.take_along_axis(r.topk_ids, order, axis=-1)
        lps = np.take_along_axis(lps, order, axis=-1)
        kept = (~padded).sum(axis=-1).tolist()
        return cls(
            key=r.key,
            cached=answer.cached,
            dataset=answer.dataset,
            prompt_ids=r.prompt_ids.tolist(),
            completion_ids=r.completion_ids.tolist(),
            completion_text=r.completion_text,
            finish_reason=r.finish_reason,
            logprob_start=int(r.logprob_start),
            topk_ids=[row[:n] for row, n in zip(ids.tolist(), kept, strict=True)],
            topk_logprobs=[row[:n] for row, n in zip(lps.tolist(), kept, strict=True)],
            token_logprob=_finite(r.token_logprob),
            tail_logprob=_finite(r.tail_logprob),
            score_logprobs=score_logprobs(answer),
        )


class ScoreResponse(BaseModel):
    results: list[AnswerResponse]


class JobCreate(_Strict, Sampling):
    input: str = Field(description="Input file (JSONL, JSONL.zst, Parquet) under the data root.")
    output: str = Field(description="Dataset name; the dataset is <data_root>/<output>.")
    k: int | None = Field(None, ge=1)

    def to_spec(self, input_path: Path, default_k: int) -> JobSpec:
        """The job's spec: the input resolved inside the data root, k defaulted."""
        return JobSpec(
            input=str(input_path),
            output=self.output,
            k=self.k or default_k,
            **self.as_sampling().model_dump(),
        )


class DatasetSummary(BaseModel):
    name: str
    rows: int = 0
    tokens: int = 0
    bytes: int = 0
    shards: int = 0
    pending_rows: int = Field(0, description="Rows stored but not yet published as a shard.")
    updated: float | None = None
    info: DatasetInfo | None = None
    error: str | None = None

    @classmethod
    def of(cls, name: str, manifest: Manifest, pending_rows: int) -> DatasetSummary:
        return cls(
            name=name,
            rows=manifest.rows,
            tokens=manifest.tokens,
            bytes=manifest.bytes,
            shards=len(manifest.shards),
            pending_rows=pending_rows,
            updated=manifest.updated,
            info=manifest.info,
        )


def text_token_ids(text: str, tokenizer: Any, max_chars: int) -> tuple[int, ...]:
    """A raw text prompt (foreign protocols send text without a chat template) as ids:
    at most ``max_chars`` characters before tokenising, and not empty after."""
    if len(text) > max_chars:
        raise QueryError("prompt", _too_long(len(text), max_chars))
    ids = tuple(tokenizer(text)["input_ids"])
    if not ids:
        raise QueryError("prompt", "is empty: there is nothing to score or continue")
    return ids


def sampling_of(**fields: Any) -> Sampling:
    """``Sampling`` from a foreign body's fields; a value out of range is a QueryError
    naming the field (a 422), as for our own bodies."""
    try:
        return Sampling(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        raise QueryError(str(first["loc"][0]), first["msg"]) from None


def _too_long(chars: int, max_chars: int) -> str:
    return (
        f"is {chars:,} characters; the server takes at most {max_chars:,} "
        "(setting max_prompt_chars)"
    )


def score_logprobs(answer: Answer) -> list[list[float | None]] | None:
    """The answer's log-probs at its score_ids, -inf as null; None when none were asked."""
    scores = getattr(answer, "score_logprobs", None)
    return None if scores is None else [_finite(row) for row in scores]


def _finite(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]
