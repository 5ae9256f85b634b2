"""One sequence as the teacher produced it: the in-memory twin of a shard row."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import codec


@dataclass
class SequenceRecord:
    """A prompt, its completion and the teacher's top-k over the scored positions.

    ``topk_ids``/``topk_logprobs`` are [n, k] with n = len(prompt_ids) +
    len(completion_ids) - logprob_start; ``topk_logprobs`` are float32 raw log-probs in any
    order (the writer puts them in canonical order). ``token_logprob`` [n] is the log-prob
    of the token that actually came next. ``tail_logprob`` [n], the log of the mass
    outside the top-k, is computed here from ``topk_logprobs`` when not given (a backend
    with more exact values may give it).
    """

    key: str
    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_logprob: np.ndarray
    completion_text: str | None = None
    logprob_start: int | None = None
    tail_logprob: np.ndarray | None = None
    finish_reason: str | None = None
    request: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompt_ids = np.asarray(self.prompt_ids, dtype=np.int32).reshape(-1)
        self.completion_ids = np.asarray(self.completion_ids, dtype=np.int32).reshape(-1)
        self.topk_ids = np.asarray(self.topk_ids)
        self.topk_logprobs = np.asarray(self.topk_logprobs, dtype=np.float32)
        self.token_logprob = np.asarray(self.token_logprob, dtype=np.float32).reshape(-1)
        if self.logprob_start is None:
            self.logprob_start = len(self.prompt_ids)
        self.validate()
        if self.tail_logprob is None:
            self.tail_logprob = codec.tail_logprob(self.topk_logprobs)
        else:
            self.tail_logprob = np.asarray(self.tail_logprob, dtype=np.float32).reshape(-1)
            if self.tail_logprob.shape != (self.n_scored,):
                raise ValueError(
                    f"record {self.key[:16]}: tail_logprob has {self.tail_logprob.size} values,"
                    f" want {self.n_scored}"
                )

    @property
    def n_scored(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids) - int(self.logprob_start)

    def validate(self) -> None:
        """Raise ValueError naming the field whose shape breaks the contract."""
        n, where = self.n_scored, f"record {self.key[:16]}"
        if not 1 <= int(self.logprob_start) <= len(self.prompt_ids) + len(self.completion_ids):
            raise ValueError(
                f"{where}: logprob_start={self.logprob_start} outside 1..{n + self.logprob_start}"
            )
        if self.topk_ids.ndim != 2 or self.topk_ids.shape[0] != n:
            raise ValueError(f"{where}: topk_ids has shape {self.topk_ids.shape}, want [{n}, k]")
        if self.topk_logprobs.shape != self.topk_ids.shape:
            raise ValueError(
                f"{where}: topk_logprobs has shape {self.topk_logprobs.shape},"
                f" want {self.topk_ids.shape} like topk_ids"
            )
        if self.token_logprob.shape != (n,):
            raise ValueError(
                f"{where}: token_logprob has {self.token_logprob.size} values, want {n}"
            )
        if np.isnan(self.topk_logprobs).any() or (self.topk_logprobs > 1e-4).any():
            raise ValueError(f"{where}: topk_logprobs must be log-probabilities (<= 0, not NaN)")

    def meta_json(self) -> str:
        return json.dumps(self.meta, sort_keys=True, ensure_ascii=False, default=str)

    def request_json(self) -> str:
        return json.dumps(self.request, sort_keys=True, ensure_ascii=False, default=str)
