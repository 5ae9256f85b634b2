"""The older ``trl vllm-serve`` server's own endpoints on the wire, read from its source.

Before TRL's client moved to vLLM's OpenAI API (served by protocol_openai.py), ``trl
vllm-serve`` ran a FastAPI app of its own, which TRL releases of that time (and tools
built on them) call: ``POST /get_sequence_logprobs/`` and ``POST /generate/``.

- ``/get_sequence_logprobs/``: whole ``sequences`` with ``prompt_lengths``; per sequence
  and per position from its prompt length on, the entries of vLLM's prompt log-probs
  sorted by rank (``top_logprobs`` of them, plus the actual token when it falls outside),
  as nested JSON lists, or with ``response_format: "binary"`` as base64 numpy arrays
  ``[batch, longest completion, top_logprobs]`` (float32, ``-inf`` padded; token ids
  int32, 0 padded) plus the actual token's ``[batch, longest completion, 1]``. A
  position 0 (a prompt length of 0) has no distribution: an empty entry, as there. It
  is the same score query as ``/v1/completions``' ``prompt_logprobs`` (``seq[:1]``
  followed by ``seq[1:]``), so both routes and ``/v1/score`` share cache rows. That
  server also drew one token per sequence and threw it away; this one does not.
- ``/generate/``: ``prompts`` (texts or token-id lists); per completion token the
  sampled token and the top ``logprobs``, sorted by descending log-prob.

Temperatures follow ``logprobs_mode`` exactly as in protocol_openai.py. Fields this
server does not implement at other than their neutral values (``n``, penalties,
``top_k``, ``min_p``, ``images``, structured outputs, ``generation_kwargs`` other than
``seed``) are refused with 422 naming the field.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .backend import Query
from .protocol import sampling_of, text_token_ids
from .protocol_openai import Positions, Wire
from .store import Answer


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SequenceLogprobsBody(_Body):
    sequences: list[list[int]] = Field(min_length=1)
    prompt_lengths: list[int]
    top_logprobs: int = Field(100, ge=1)
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    response_format: Literal["json", "binary"] = "json"

    @model_validator(mode="after")
    def _lengths(self) -> SequenceLogprobsBody:
        if len(self.prompt_lengths) != len(self.sequences):
            raise ValueError(
                f"prompt_lengths: {len(self.prompt_lengths)} given for "
                f"{len(self.sequences)} sequences; give one per sequence"
            )
        for i, (seq, p) in enumerate(zip(self.sequences, self.prompt_lengths, strict=True)):
            if not 0 <= p <= len(seq):
                raise ValueError(f"prompt_lengths.{i}: {p} is outside 0..{len(seq)}")
        return self

    def query(self, i: int) -> Query | None:
        """Sequence ``i``'s score query (None: a single token, nothing to score)."""
        seq = tuple(self.sequences[i])
        if len(seq) < 2:
            return None
        return Query("score", seq[:1], self.top_logprobs, completion_ids=seq[1:])

    def field_name(self, i: int, part: str) -> str:
        return "top_logprobs" if part == "k" else f"sequences.{i}"

    def response(self, answers: list[Answer | None], wire: Wire) -> dict[str, Any]:
        """The old server's answer: nested lists, or base64 arrays for ``binary``."""
        k = self.top_logprobs
        positions = [
            Positions.of(a, wire, self.temperature) if a is not None else None for a in answers
        ]
        spans = [
            range(max(p, 1), len(s))
            for s, p in zip(self.sequences, self.prompt_lengths, strict=True)
        ]
        if self.response_format == "json":
            logprobs, token_ids = [], []
            for seq_positions, p, span in zip(positions, self.prompt_lengths, spans, strict=True):
                empty = [[]] if p == 0 else []
                rows = [seq_positions.ranked(j - 1, k) for j in span] if seq_positions else []
                logprobs.append(empty + [[_json_float(v) for _, v in row] for row in rows])
                token_ids.append(empty + [[t for t, _ in row] for row in rows])
            return {"logprobs": logprobs, "logprob_token_ids": token_ids}
        lengths = [len(s) - p for s, p in zip(self.sequences, self.prompt_lengths, strict=True)]
        shape = (len(self.sequences), max(lengths), k)
        top = np.full(shape, -np.inf, dtype=np.float32)
        top_ids = np.zeros(shape, dtype=np.int32)
        actual = np.full(shape[:2] + (1,), -np.inf, dtype=np.float32)
        actual_ids = np.zeros(shape[:2] + (1,), dtype=np.int32)
        for b, (seq_positions, p, span) in enumerate(
            zip(positions, self.prompt_lengths, spans, strict=True)
        ):
            for j in span if seq_positions else ():
                t = j - p
                row = seq_positions.ranked(j - 1, k)[:k]
                top_ids[b, t, : len(row)] = [tok for tok, _ in row]
                top[b, t, : len(row)] = [v for _, v in row]
                token, value, _ = seq_positions.entries(j - 1, k)[0]
                actual_ids[b, t, 0] = token
                if not np.isnan(value):
                    actual[b, t, 0] = value
        return {
            "logprobs_b64": _b64(top),
            "token_ids_b64": _b64(top_ids),
            "actual_logprobs_b64": _b64(actual),
            "actual_token_ids_b64": _b64(actual_ids),
            "shape": list(shape),
            "completion_lengths": lengths,
        }


class GenerateBody(_Body):
    prompts: list[list[int]] | list[str] = Field(min_length=1)
    images: list[Any] | None = None
    n: int = 1
    repetition_penalty: float = 1.0
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(0, ge=0)
    structured_outputs_regex: str | None = None
    generation_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _only_what_is_served(self) -> GenerateBody:
        unsupported = {
            "images": bool(self.images) and any(i is not None for i in self.images),
            "n": self.n != 1,
            "repetition_penalty": self.repetition_penalty != 1.0,
            "top_k": self.top_k not in (-1, 0),
            "min_p": self.min_p != 0.0,
            "structured_outputs_regex": self.structured_outputs_regex is not None,
            "generation_kwargs": bool(set(self.generation_kwargs) - {"seed"}),
        }
        bad = [name for name, given in unsupported.items() if given]
        if bad:
            raise ValueError(
                f"{', '.join(bad)}: not served by distillcache (one unpenalised, unconstrained "
                "text completion per prompt; generation_kwargs may hold only seed)"
            )
        return self

    def query(self, i: int, tokenizer: Any, max_chars: int) -> Query:
        prompt = self.prompts[i]
        if isinstance(prompt, str):
            prompt = text_token_ids(prompt, tokenizer, max_chars)
        sampling = sampling_of(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.generation_kwargs.get("seed"),
        )
        return Query("generate", tuple(prompt), max(1, self.logprobs or 0), sampling)

    def field_name(self, i: int, part: str) -> str:
        if part == "prompt":
            return f"prompts.{i}"
        return "logprobs" if part == "k" else part

    def response(self, answers: list[Answer], wire: Wire) -> dict[str, Any]:
        """Prompt and completion ids, and per completion token the sampled token then the top
        ``logprobs`` by descending log-prob (None, None when ``logprobs`` is None)."""
        positions = [Positions.of(a, wire, self.temperature) for a in answers]
        out: dict[str, Any] = {
            "prompt_ids": [a.record.prompt_ids.tolist() for a in answers],
            "completion_ids": [p.ids for p in positions],
            "logprobs": None,
            "logprob_token_ids": None,
        }
        if self.logprobs is not None:
            rows = [
                [sorted(p.ranked(j, self.logprobs), key=lambda e: -e[1]) for j in range(len(p.ids))]
                for p in positions
            ]
            out["logprobs"] = [[[_json_float(v) for _, v in r] for r in seq] for seq in rows]
            out["logprob_token_ids"] = [[[t for t, _ in r] for r in seq] for seq in rows]
        return out


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode("ascii")


def _json_float(value: float) -> float | None:
    return None if np.isnan(value) else value
