"""What a teacher can be asked: the one check every query passes, whoever made it.

HTTP routes, batch jobs and the backends themselves all call ``Limits.check``, so a query
is refused by the same rule with the same message wherever it comes from. The check
knows only the teacher's numbers (largest k, vocabulary, context) and names the query's
parts generically (``prompt``, ``completion``, ``k``, ``max_tokens``, ``logprob_start``);
a caller with its own field names (``pairs.3.completion_ids``) maps them once, at its edge.

Ranges of the sampling parameters are the ``Sampling`` model's own (shared/schema.py):
a query cannot hold a temperature or seed the backends would choke on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .backend import Query


class QueryError(ValueError):
    """A query the teacher cannot take; ``field`` names the offending part of it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Limits:
    """The teacher's bounds. ``min_k`` 0 lets a backend's own callers (benchmarks) ask for
    completions without log-probs; the service asks for at least one."""

    max_k: int
    vocab_size: int
    max_model_len: int
    min_k: int = 1

    def check(self, query: Query) -> None:
        """Raise QueryError naming the part of ``query`` the teacher cannot take."""
        context, vocab = self.max_model_len, self.vocab_size
        top = min(self.max_k, vocab)
        if not self.min_k <= query.k <= top:
            raise QueryError("k", f"must be between {self.min_k} and {top}, got {query.k}")
        n_prompt = len(query.prompt_ids)
        if n_prompt == 0:
            raise QueryError("prompt", "is empty")
        self.check_ids("prompt", query.prompt_ids)
        self.check_ids("completion", query.completion_ids)
        if n_prompt >= context:
            raise QueryError(
                "prompt", f"{n_prompt} tokens leave no room in the teacher's context of {context}"
            )
        if query.mode == "generate":
            max_tokens = query.sampling.max_tokens
            if n_prompt + max_tokens > context:
                raise QueryError(
                    "max_tokens",
                    f"prompt of {n_prompt} tokens + max_tokens {max_tokens} exceeds the teacher's "
                    f"context of {context}",
                )
            return
        n_completion = len(query.completion_ids)
        if n_completion == 0:
            raise QueryError("completion", "is empty: there is nothing to score")
        # vLLM decodes one token past a scored text, so the text must leave room for it.
        if n_prompt + n_completion >= context:
            raise QueryError(
                "completion",
                f"prompt of {n_prompt} + completion of {n_completion} tokens: scoring takes "
                f"at most {context - 1} in the teacher's context of {context}",
            )
        if not 1 <= query.start < n_prompt + n_completion:
            raise QueryError(
                "logprob_start",
                f"must be between 1 and {n_prompt + n_completion - 1}, got {query.start}",
            )
        self._check_score_ids(query, n_prompt + n_completion - query.start)

    def check_ids(self, name: str, ids: Sequence[int]) -> None:
        """Raise QueryError naming ``name`` when a token id is outside the vocabulary."""
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise QueryError(
                name, f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
            )

    def _check_score_ids(self, query: Query, positions: int) -> None:
        """score_ids: none, or one list per scored position, each of at most ``max_k``
        distinct ids in the vocabulary (so an answer stays within positions x 2k)."""
        if not query.score_ids:
            return
        if len(query.score_ids) != positions:
            raise QueryError(
                "score_ids",
                f"has {len(query.score_ids)} lists; give one per scored position ({positions})",
            )
        for j, ids in enumerate(query.score_ids):
            if len(ids) > self.max_k:
                raise QueryError(
                    "score_ids", f"position {j} has {len(ids)} ids; at most {self.max_k}"
                )
            if len(set(ids)) != len(ids):
                raise QueryError("score_ids", f"position {j} repeats a token id")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise QueryError(
                    "score_ids",
                    f"position {j}: token id {bad[0]} is outside the vocabulary "
                    f"(0..{self.vocab_size - 1})",
                )
