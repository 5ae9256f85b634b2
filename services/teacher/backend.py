"""The one small interface every teacher backend implements, and the data it speaks.

A backend turns token ids into the teacher's top-k log-probs; it knows nothing of HTTP,
caching or shards. Log-probs are always the raw T=1 log-softmax of the model's logits
(sliced to the tokenizer's vocabulary), whatever sampling temperature picked the tokens:
the trainer applies its own distillation temperature.

A ``Query`` is one question to the teacher in token ids, the same object from the HTTP
route or job row that made it, through the cache (whose key it defines), to the backend
that answers it. A ``TeacherOutput`` is what the backend made of it; the service turns it
into a ``SequenceRecord`` (a shard row) by adding the key and the tail.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from distillcache.shared.keys import Mode
from distillcache.shared.schema import SampledLogits, Sampling


@dataclass(frozen=True)
class Query:
    """One question to the teacher.

    ``generate``: a completion of ``prompt_ids`` drawn with ``sampling``. ``score``:
    teacher forcing of ``prompt_ids + completion_ids``, with log-probs at positions
    ``logprob_start..`` (default: the completion's positions); ``sampling`` is unused.
    ``score_ids`` (score only; empty, or one tuple per scored position): extra token ids
    whose exact log-probs the answer also carries. They are not part of the cache key:
    the top-k part of the answer is the same with or without them (see service.py).
    ``sampled`` (the store's mode, ``in_mode``): answer each position with draws from the
    teacher instead of its top-k. The draws are the answer, so the mode is in the key, and
    ``k`` is then the draw count there whatever the request asked. ``draw_seed`` seeds
    them: ``SampledLogits.seed_for`` of the query's own key, set by the service once keyed.
    """

    mode: Mode
    prompt_ids: tuple[int, ...]
    k: int
    sampling: Sampling = Sampling()
    completion_ids: tuple[int, ...] = ()
    logprob_start: int | None = None
    score_ids: tuple[tuple[int, ...], ...] = ()
    sampled: SampledLogits | None = None
    draw_seed: int | None = None

    def in_mode(self, sampled: SampledLogits | None) -> Query:
        """This query as a store of mode ``sampled`` asks it (None: the top-k)."""
        if sampled is None or self.sampled == sampled:
            return self
        return dataclasses.replace(self, sampled=sampled)

    @property
    def key_k(self) -> int:
        """The k the cache key covers: a sampled answer's width is its draw count."""
        return self.k if self.sampled is None else self.sampled.draws

    @property
    def start(self) -> int:
        """The first scored position: that of the first completion token unless given."""
        return len(self.prompt_ids) if self.logprob_start is None else self.logprob_start

    @property
    def answer_entries(self) -> int:
        """Log-probs an answer to this query holds at most: scored positions x k, plus the
        score_ids' values (what a response limit counts)."""
        if self.mode == "generate":
            return self.sampling.max_tokens * self.k
        positions = len(self.prompt_ids) + len(self.completion_ids) - self.start
        return positions * self.k + sum(len(ids) for ids in self.score_ids)

    def key_sampling(self) -> dict[str, Any]:
        """What the cache key covers beyond ids and k: a generation's sampling, normalised
        (greedy ignores ``top_p`` and ``seed``); where scoring starts, when it is not the
        first completion token."""
        drawn = {} if self.sampled is None else {"sampled": self.sampled.model_dump()}
        if self.mode == "generate":
            return {**self.sampling.normalized().model_dump(), **drawn}
        if self.start == len(self.prompt_ids):
            return drawn
        return {"logprob_start": self.start, **drawn}

    def request_json(self) -> dict[str, Any]:
        """The shard's ``request`` column: what the key covers, in readable form."""
        return {"mode": self.mode, "k": self.key_k, **self.key_sampling()}


@dataclass
class TeacherOutput:
    """What the teacher produced for one query, in the shard contract's terms.

    ``topk_ids``/``topk_logprobs`` are [n, k] (any order within a position; for a
    sampled query [n, N], the draws in memory form: see ``shared.schema``),
    ``token_logprob`` [n] is the log-prob of the token that actually came next.
    ``tail_logprob`` [n], the log of the mass outside the top-k, is given by a backend
    that computed it from more exact values than the float32 top-k (None: computed from
    those when the record is made).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_text: str
    logprob_start: int
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_logprob: np.ndarray
    finish_reason: str
    tail_logprob: np.ndarray | None = None
    score_logprobs: list[np.ndarray] | None = None  # per position, at the query's score_ids


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
    dtype: str  # the torch dtype the weights run in, e.g. "float32", "bfloat16"
    score_ids: bool  # whether it returns log-probs at a query's score_ids

    async def generate(self, queries: list[Query]) -> list[TeacherOutput]: ...

    async def score(self, queries: list[Query]) -> list[TeacherOutput]: ...

    async def close(self) -> None: ...


def stop_token_ids(tokenizer: Any, generation_config: Any) -> frozenset[int]:
    """The tokenizer's eos plus the generation config's eos ids: what vLLM stops on too."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    extra = getattr(generation_config, "eos_token_id", None)
    if extra is not None:
        ids.update(int(i) for i in ([extra] if isinstance(extra, int) else extra))
    return frozenset(ids)
