"""The one small interface every teacher backend implements, and the data it speaks.

A backend turns token ids into the teacher's top-k log-probs; it knows nothing of HTTP,
caching or shards. Log-probs are always the raw T=1 log-softmax of the model's logits
(sliced to the tokenizer's vocabulary), whatever sampling temperature picked the tokens:
the trainer applies its own distillation temperature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of a generation; every field is part of the cache key."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class GenerateRequest:
    prompt_ids: tuple[int, ...]
    k: int
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class ScoreRequest:
    """Teacher forcing of a fixed text: log-probs at positions ``logprob_start..`` of
    ``prompt_ids + completion_ids`` (default: the completion's positions)."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    k: int
    logprob_start: int | None = None


@dataclass
class TeacherOutput:
    """What the teacher produced for one request, in the shard contract's terms.

    ``topk_ids``/``topk_logprobs`` are [n, k] (any order within a position),
    ``token_logprob`` [n] is the log-prob of the token that actually came next.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_text: str
    logprob_start: int
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_logprob: np.ndarray
    finish_reason: str


class TeacherBackend(Protocol):
    """A loaded teacher model. One instance per process; safe to call concurrently."""

    name: str
    version: str
    model_id: str
    revision: str
    tokenizer: Any
    vocab_size: int
    logit_width: int
    max_k: int
    max_model_len: int

    async def generate(self, requests: list[GenerateRequest]) -> list[TeacherOutput]: ...

    async def score(self, requests: list[ScoreRequest]) -> list[TeacherOutput]: ...

    async def close(self) -> None: ...
