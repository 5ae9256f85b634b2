"""vLLM's OpenAI-compatible ``/v1/completions`` on the wire: the body, its queries, the answer.

Who calls it: the ``openai`` Python client (text prompts, ``logprobs``, generation), TRL's
``VLLMClient`` (``generate``: token-id prompts with ``return_token_ids`` and
``return_tokens_as_token_ids``; ``get_sequence_logprobs``: whole sequences with
``prompt_logprobs`` and ``max_tokens`` 1) and axolotl's online-teacher collator (token-id
batches, ``echo``, ``prompt_logprobs``, ``logprobs: true``). The shapes follow vLLM's
``CompletionRequest``/``CompletionResponse``, read from vLLM's source.

How a body becomes queries (one ``Plan`` per prompt):

- ``prompt_logprobs`` (or ``echo`` with ``logprobs``) needs the teacher's distribution
  at every prompt position after the first: a ``score`` query of ``prompt[:1]`` followed
  by ``prompt[1:]``, which is exactly what ``/v1/score`` answers for ``prompt_ids =
  prompt[:1]``, ``completion_ids = prompt[1:]`` (same key, same cache row).
- ``max_tokens`` > 0 (vLLM's default is 16) is a ``generate`` query with the body's
  temperature, top_p and seed. TRL's scoring call asks for one token, so it costs one
  generation too, cached like any other.

Values. Raw log-probs are the stored truth. ``logprobs_mode`` (the setting, named after
vLLM's flag) says what a temperature does to the answer: ``raw_logprobs`` (vLLM's
default) returns the stored values whatever the temperature; ``processed_logprobs``
divides them by the temperature and renormalises **over the k entries returned** (the
actual token outside them shares the same normaliser). vLLM renormalises over the whole
vocabulary, which the store no longer holds, so at T != 1 every value of a position is
higher than vLLM's by the same amount, ``log(1 + tail_T / topk_T)`` (the tempered mass
outside the top-k relative to that inside); ranks and differences between entries at a
position are exact. At T = 1 and T = 0 (greedy; vLLM does not temper greedy requests)
the values are the stored ones in both modes.

Ranks. The store keeps the top-k and the actual token's log-prob, not the actual token's
rank in the vocabulary: when the actual token is outside the top-k its ``rank`` is
``k + 1``, a lower bound (vLLM reports the exact rank).

Unknown fields are ignored, as vLLM ignores them (axolotl sends ``max_new_tokens``,
``top_logprobs`` and ``sampling_params``, which vLLM drops); fields distillcache does
not implement (``n`` > 1, ``stream``, ``stop``, penalties, ``top_k``, ``min_p``,
``logit_bias``, ``best_of``, ``suffix``) are refused with 422 naming the field rather
than silently answered differently.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distillcache.shared.reader import PAD_ID
from distillcache.shared.schema import LogprobCodec, Sampling

from .backend import Query
from .protocol import AnswerResponse, sampling_of, text_token_ids
from .store import Answer

LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]
# vLLM's default max_tokens for a completion that names none.
DEFAULT_MAX_TOKENS = 16


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: list[list[int]] | list[int] | list[str] | str
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=0)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = None
    seed: int | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    prompt_logprobs: int | None = Field(None, ge=0)
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    skip_special_tokens: bool = True
    # Accepted only at the values that change nothing (checked below).
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _only_what_is_served(self) -> CompletionBody:
        unsupported = {
            "n": self.n != 1,
            "best_of": self.best_of not in (None, 1),
            "stream": self.stream,
            "stop": bool(self.stop),
            "suffix": bool(self.suffix),
            "presence_penalty": self.presence_penalty not in (None, 0.0),
            "frequency_penalty": self.frequency_penalty not in (None, 0.0),
            "repetition_penalty": self.repetition_penalty not in (None, 1.0),
            "top_k": self.top_k not in (None, 0, -1),
            "min_p": self.min_p not in (None, 0.0),
            "logit_bias": bool(self.logit_bias),
        }
        if not self.prompts():
            raise ValueError("prompt: is empty; give a text, a token-id list or a batch of them")
        bad = [name for name, given in unsupported.items() if given]
        if bad:
            raise ValueError(
                f"{', '.join(bad)}: not served by distillcache's completions (one unpenalised "
                "completion per prompt, no streaming); leave them at their defaults"
            )
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: one text or one id list each."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]

    @property
    def temperature_or_default(self) -> float:
        """The request's temperature; unset is vLLM's default, 1."""
        return 1.0 if self.temperature is None else self.temperature

    def sampling(self) -> Sampling:
        """The generation's sampling (``max_tokens`` > 0)."""
        return sampling_of(
            max_tokens=self.max_tokens,
            temperature=self.temperature_or_default,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
        )

    def plan(self, i: int, prompt: str | list[int], tokenizer: Any, max_chars: int) -> Plan:
        """Prompt ``i``'s queries (unchecked)."""
        if isinstance(prompt, str):
            ids, text = text_token_ids(prompt, tokenizer, max_chars), prompt
        else:
            ids, text = tuple(prompt), None
        score = generate = None
        wants_prompt = self.prompt_logprobs is not None or (self.echo and self.logprobs is not None)
        if wants_prompt and len(ids) > 1:
            k = max(1, self.prompt_logprobs or 0, (self.logprobs or 0) if self.echo else 0)
            score = Query("score", ids[:1], k, completion_ids=ids[1:])
        if self.max_tokens:
            generate = Query("generate", ids, max(1, self.logprobs or 0), self.sampling())
        return Plan(ids, text, score, generate)

    def field_name(self, i: int, part: str) -> str:
        """The body's field for a part of prompt ``i``'s queries named by a QueryError."""
        if part in ("prompt", "completion"):
            return "prompt" if len(self.prompts()) == 1 else f"prompt.{i}"
        if part == "k":
            return "prompt_logprobs" if self.prompt_logprobs is not None else "logprobs"
        return part


@dataclass(frozen=True)
class Plan:
    """What one prompt asks of the teacher: its ids (and text, when it came as text), the
    scoring of its positions and the generation after it (None: not asked)."""

    prompt_ids: tuple[int, ...]
    text: str | None
    score: Query | None
    generate: Query | None

    def queries(self) -> list[Query]:
        return [q for q in (self.score, self.generate) if q is not None]


@dataclass(frozen=True)
class Wire:
    """How answers are written: the codec they pass through, the logprobs mode and the
    tokenizer that names tokens."""

    codec: LogprobCodec
    mode: LogprobsMode
    tokenizer: Any


def completion_response(
    body: CompletionBody, plans: list[Plan], answers: list[Answer], model: str, wire: Wire
) -> dict[str, Any]:
    """vLLM's ``CompletionResponse`` for ``plans``, whose queries ``answers`` answer in order."""
    temperature = body.temperature_or_default
    it = iter(answers)
    choices, n_prompt, n_completion = [], 0, 0
    for i, plan in enumerate(plans):
        scored = Positions.of(next(it), wire, temperature) if plan.score else None
        drawn = Positions.of(next(it), wire, temperature) if plan.generate else None
        choices.append(_choice(i, body, plan, scored, drawn, wire))
        n_prompt += len(plan.prompt_ids)
        n_completion += len(drawn.ids) if drawn else 0
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_completion,
            "total_tokens": n_prompt + n_completion,
        },
    }


@dataclass
class Positions:
    """One answer's scored positions as the client will see them: ``ids`` the actual tokens,
    ``top_ids``/``top`` [n, k] most likely first, ``actual`` [n] (NaN: not stored), after
    the codec and the temperature."""

    ids: list[int]
    top_ids: np.ndarray
    top: np.ndarray
    actual: np.ndarray
    finish_reason: str | None

    @classmethod
    def of(cls, answer: Answer, wire: Wire, temperature: float) -> Positions:
        r = AnswerResponse.of(answer, wire.codec)
        seq = r.prompt_ids + r.completion_ids
        # Adaptive k keeps a number of entries per position: padded back to one width
        # (id PAD_ID, log-prob -inf), which ``entries`` leaves out.
        width = max((len(row) for row in r.topk_ids), default=0)
        top_ids = np.full((len(r.topk_ids), width), PAD_ID, dtype=np.int64)
        top = np.full((len(r.topk_ids), width), -np.inf)
        for j, (ids, lps) in enumerate(zip(r.topk_ids, r.topk_logprobs, strict=True)):
            top_ids[j, : len(ids)], top[j, : len(lps)] = ids, lps
        actual = np.array([np.nan if v is None else v for v in r.token_logprob], dtype=np.float64)
        if wire.mode == "processed_logprobs" and temperature not in (0.0, 1.0):
            scaled = top / temperature
            norm = np.logaddexp.reduce(scaled, axis=-1)
            top = scaled - norm[:, None]
            actual = actual / temperature - norm
        return cls(
            seq[r.logprob_start :],
            top_ids,
            top,
            actual,
            r.finish_reason,
        )

    def entries(self, j: int, k: int) -> list[tuple[int, float, int]]:
        """Position ``j``'s (token, logprob, rank): the actual token first, then the top
        ``k`` by rank, as vLLM lists them; an actual token outside the top-k has rank k+1,
        a lower bound (the store does not keep its exact rank)."""
        token = self.ids[j]
        top = [
            (int(t), float(v), r + 1)
            for r, (t, v) in enumerate(zip(self.top_ids[j], self.top[j], strict=True))
            if t != PAD_ID
        ]
        inside = next((e for e in top if e[0] == token), None)
        first = inside or (token, float(self.actual[j]), len(top) + 1)
        return [first] + [e for e in top[:k] if e[0] != token]

    def ranked(self, j: int, k: int) -> list[tuple[int, float]]:
        """Position ``j``'s (token, logprob) by rank: the top ``k``, then the actual token
        when it falls outside them."""
        return [(t, v) for t, v, _ in sorted(self.entries(j, k), key=lambda e: e[2])]


def _choice(
    i: int,
    body: CompletionBody,
    plan: Plan,
    scored: Positions | None,
    drawn: Positions | None,
    wire: Wire,
) -> dict[str, Any]:
    tok = wire.tokenizer
    ids = list(plan.prompt_ids)
    completion_ids = drawn.ids if drawn else []
    prompt_text = plan.text if plan.text is not None else tok.decode(ids)
    completion_text = tok.decode(completion_ids, skip_special_tokens=body.skip_special_tokens)

    def name(t: int) -> str:
        return f"token_id:{t}" if body.return_tokens_as_token_ids else tok.decode([t])

    prompt_logprobs = None
    if body.prompt_logprobs is not None:
        prompt_logprobs = [None] + [
            {
                str(t): {"logprob": v, "rank": r, "decoded_token": name(t)}
                for t, v, r in scored.entries(j, body.prompt_logprobs)
            }
            for j in range(len(ids) - 1)
        ]  # type: ignore[union-attr]
    logprobs = None
    if body.logprobs is not None:
        rows: list[tuple[int, dict[str, float] | None, float | None]] = []
        if body.echo:
            rows.append((ids[0], None, None))
            rows += _rows(scored, len(ids) - 1, body.logprobs, name) if scored else []
        rows += _rows(drawn, len(completion_ids), body.logprobs, name) if drawn else []
        offset = 0 if body.echo else len(prompt_text)
        offsets = []
        for t, _, _ in rows:
            offsets.append(offset)
            offset += len(tok.decode([t]))
        logprobs = {
            "text_offset": offsets,
            "token_logprobs": [v for _, _, v in rows],
            "tokens": [name(t) for t, _, _ in rows],
            "top_logprobs": [top for _, top, _ in rows],
        }
    return {
        "index": i,
        "text": (prompt_text if body.echo else "") + completion_text,
        "logprobs": logprobs,
        "finish_reason": drawn.finish_reason if drawn else "length",
        "stop_reason": None,
        "prompt_logprobs": prompt_logprobs,
        "prompt_token_ids": ids if body.return_token_ids else None,
        "token_ids": completion_ids if body.return_token_ids else None,
    }


def _rows(
    positions: Positions, n: int, k: int, name: Any
) -> list[tuple[int, dict[str, float], float | None]]:
    """OpenAI's per-token logprobs rows: (token, its top-k plus itself, its logprob)."""
    rows = []
    for j in range(n):
        entries = positions.entries(j, k)
        actual = entries[0][1]
        rows.append(
            (
                positions.ids[j],
                {name(t): v for t, v, _ in entries},
                None if np.isnan(actual) else actual,
            )
        )
    return rows


def models_response(model: str, root: str, max_model_len: int, created: int) -> dict[str, Any]:
    """vLLM's ``/v1/models``: the one teacher this server answers for."""
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "distillcache",
                "root": root,
                "parent": None,
                "max_model_len": max_model_len,
            }
        ],
    }
