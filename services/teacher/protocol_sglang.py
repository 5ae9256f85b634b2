"""SGLang's ``POST /generate`` on the wire, in the one shape axolotl's online teacher sends.

axolotl's ``OnlineTeacherCollator`` (SGLang flavour) scores token-id batches:
``input_ids`` (a batch), ``return_logprob``, ``top_logprobs_num: k``,
``logprob_start_len: 0``, ``return_text_in_logprobs``, ``echo``, and
``sampling_params: {max_new_tokens: 0, temperature, skip_special_tokens}``. SGLang
answers a list, one object per sequence, whose ``meta_info.input_top_logprobs`` has one
entry per input token: ``null`` for the first, then the top-k as ``[logprob, token_id,
text]`` most likely first (text ``null`` unless ``return_text_in_logprobs``), and
``meta_info.input_token_logprobs`` the actual tokens' ``[logprob, token_id, text]``.

Only that scoring shape is served: generation (``max_new_tokens`` > 0) goes through
``/v1/completions``, and a ``logprob_start_len`` other than 0 is refused, both with 422
naming the field. Each sequence is the same score query as ``/v1/completions``'
``prompt_logprobs`` (``ids[:1]`` followed by ``ids[1:]``), so the three protocols share
cache rows; a temperature follows ``logprobs_mode`` as there (protocol_openai.py).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .backend import Query
from .protocol_openai import Positions, Wire
from .store import Answer


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_new_tokens: int = 128
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    skip_special_tokens: bool = True


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_ids: list[list[int]] | list[int]
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0)
    logprob_start_len: int = 0
    return_text_in_logprobs: bool = False
    echo: bool = False
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)

    @model_validator(mode="after")
    def _scoring_only(self) -> GenerateBody:
        if self.sampling_params.max_new_tokens != 0:
            raise ValueError(
                "sampling_params.max_new_tokens: only scoring (0) is served in SGLang's shape; "
                "generate through /v1/completions"
            )
        if not self.return_logprob or self.top_logprobs_num < 1:
            raise ValueError(
                "return_logprob, top_logprobs_num: scoring needs return_logprob true and "
                "top_logprobs_num of at least 1"
            )
        if self.logprob_start_len != 0:
            raise ValueError("logprob_start_len: only 0 (every input position) is served")
        if not self.sequences():
            raise ValueError("input_ids: is empty")
        return self

    def sequences(self) -> list[list[int]]:
        ids = self.input_ids
        return [ids] if ids and isinstance(ids[0], int) else list(ids)  # type: ignore[list-item]

    def query(self, i: int) -> Query | None:
        """Sequence ``i``'s score query (None: a single token, nothing to score)."""
        seq = tuple(self.sequences()[i])
        if len(seq) < 2:
            return None
        return Query("score", seq[:1], self.top_logprobs_num, completion_ids=seq[1:])

    def field_name(self, i: int, part: str) -> str:
        if part == "k":
            return "top_logprobs_num"
        return "input_ids" if isinstance(self.input_ids[0], int) else f"input_ids.{i}"

    def response(self, answers: list[Answer | None], wire: Wire) -> list[dict[str, Any]]:
        """SGLang's list of per-sequence answers."""
        k, tok = self.top_logprobs_num, wire.tokenizer
        temperature = self.sampling_params.temperature

        def text(t: int) -> str | None:
            return tok.decode([t]) if self.return_text_in_logprobs else None

        out = []
        for seq, answer in zip(self.sequences(), answers, strict=True):
            tops: list[Any] = [None]
            actual: list[Any] = [[None, seq[0], text(seq[0])]]
            if answer is not None:
                positions = Positions.of(answer, wire, temperature)
                for j, token in enumerate(seq[1:]):
                    tops.append([[v, t, text(t)] for t, v in positions.ranked(j, k)[:k]])
                    value = positions.entries(j, k)[0][1]
                    actual.append([value, token, text(token)])
            skip = self.sampling_params.skip_special_tokens
            out.append(
                {
                    "text": tok.decode(seq, skip_special_tokens=skip) if self.echo else "",
                    "meta_info": {
                        "prompt_tokens": len(seq),
                        "completion_tokens": 0,
                        "finish_reason": {"type": "length", "length": 0},
                        "input_token_logprobs": actual,
                        "input_top_logprobs": tops,
                    },
                }
            )
        return out
