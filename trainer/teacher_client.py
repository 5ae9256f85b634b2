"""The trainer's client of a live teacher service: ``POST /v1/score`` over Arrow IPC.

What this file decides, and why:

- Answers come as Arrow IPC (``Accept: application/vnd.apache.arrow.stream``), decoded
  with the store's codec named in the stream's metadata: binary floats, no JSON round
  trip (bench/onpolicy.py measures the difference).
- A busy teacher (429) is retried as often as it takes, after the ``Retry-After`` it
  names: it is up and will answer. A teacher that cannot be reached (connection
  refused, reset, 5xx) is retried ``max_retries`` times with doubling backoff, then the
  run stops with one line naming the URL: resuming later is exact.
- ``score_logprobs`` come back as [positions, s]; a request that asked fewer ids at some
  positions (cross-tokenizer steps ask only where a position is the same text on both
  sides) gets them padded with -inf.
- Before a run loads its student, ``/readyz`` names the teacher's tokenizer (its hash and
  size), so a student whose ids mean other tokens is refused up front; a teacher still
  loading is waited for, as its Retry-After says.
- ``score_ids`` a backend cannot answer (vLLM: 400 naming score_ids) switch the client to
  the teacher's top-k only, with one warning for the whole run; the union loss then has
  the student's ids with no teacher value, which ``union_teacher_log_probs`` reads from
  the tail bucket.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pyarrow as pa

from distillcache.shared.reader import decode_table
from distillcache.shared.schema import PARQUET_METADATA_KEY, DatasetInfo

ARROW_STREAM = "application/vnd.apache.arrow.stream"
TOKEN_ENV = "DISTILL_AUTH_TOKEN"
log = logging.getLogger(__name__)


class TeacherUnavailable(RuntimeError):
    """The teacher could not be reached after the bounded retries."""


@dataclass
class ScoredSequence:
    """The teacher's answer for one (prompt, completion) pair, per completion position:
    ``topk_ids``/``topk_logprobs`` [C, k], ``tail_logprob`` [C], ``token_logprob`` [C]
    (its log-prob of the completion's own token there) and, when score_ids were answered,
    ``score_logprobs`` [C, s] (None when the teacher could not)."""

    key: str
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logprob: np.ndarray
    score_logprobs: np.ndarray | None
    cached: bool
    token_logprob: np.ndarray


@dataclass(frozen=True)
class TeacherTokenizer:
    """The served teacher's tokenizer, as its ``/readyz`` names it: what a student's ids
    must mean for the teacher's answers to be about the student's tokens."""

    tokenizer: str
    tokenizer_hash: str
    vocab_size: int


@dataclass
class ScoreCall:
    """What one call cost (teacher tokens scored fresh, tokens answered from the cache)
    and what answered it: the ``DatasetInfo`` of the answer (its tokenizer, k, codec)."""

    scored_tokens: int = 0
    cached_tokens: int = 0
    info: DatasetInfo | None = None


class TeacherClient:
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        timeout_s: float = 300.0,
    ) -> None:
        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Accept": ARROW_STREAM}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.score_ids_supported = True
        self.busy_waits = 0  # 429s answered by waiting their Retry-After

    def close(self) -> None:
        self.http.close()

    def score(
        self,
        pairs: list[dict[str, Any]],
        *,
        k: int | None,
        dataset: str | None,
    ) -> tuple[list[ScoredSequence], ScoreCall]:
        """Score ``pairs`` (``prompt_ids``, ``completion_ids``, optional ``score_ids`` and
        ``meta``), storing them in ``dataset``."""
        if not self.score_ids_supported:
            pairs = [{f: v for f, v in p.items() if f != "score_ids"} for p in pairs]
        body: dict[str, Any] = {"pairs": pairs, "dataset": dataset}
        if k is not None:
            body["k"] = k
        response = self._request("POST", "/v1/score", body)
        if response.status_code == 400 and "score_ids" in response.text:
            log.warning(
                "teacher at %s cannot return log-probs at score_ids (%s); training on the "
                "teacher's top-k only for the rest of this run",
                self.url,
                response.json().get("detail", response.text),
            )
            self.score_ids_supported = False
            return self.score(pairs, k=k, dataset=dataset)
        if response.status_code != 200:
            raise RuntimeError(
                f"teacher at {self.url}: /v1/score answered {response.status_code}: "
                f"{response.text[:500]}"
            )
        return _decode(response.content)

    def tokenizer(self) -> TeacherTokenizer:
        """The teacher's tokenizer (``GET /readyz``). A teacher still loading is waited for
        as its Retry-After says; one whose model failed to load is a one-line error."""
        while True:
            response = self._request("GET", "/readyz", answered=(503,))
            body = response.json()
            if response.status_code == 200:
                return TeacherTokenizer(
                    body["tokenizer"], body["tokenizer_hash"], body["vocab_size"]
                )
            if body.get("status") != "loading":
                raise RuntimeError(f"teacher at {self.url}: {body.get('error', body)}")
            time.sleep(float(response.headers.get("Retry-After", "1")))

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        answered: tuple[int, ...] = (),
    ) -> httpx.Response:
        """The response to the first try that reaches the teacher and is not a 429 or a
        5xx (those in ``answered`` are answers too)."""
        failures = 0
        while True:
            try:
                response = self.http.request(method, path, json=body)
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if response.status_code == 429:
                    self.busy_waits += 1
                    time.sleep(float(response.headers.get("Retry-After", "1")))
                    continue
                if response.status_code < 500 or response.status_code in answered:
                    return response
                problem = f"HTTP {response.status_code}"
            failures += 1
            if failures > self.max_retries:
                raise TeacherUnavailable(
                    f"teacher at {self.url} did not answer after {failures} tries "
                    f"({problem}); start it (distill serve) and resume the run"
                )
            time.sleep(self.backoff_s * 2 ** (failures - 1))


def _decode(content: bytes) -> tuple[list[ScoredSequence], ScoreCall]:
    """The Arrow answer, decoded as a shard of its DatasetInfo (``decode_table``: the
    codec, and adaptive k's padding to k with id -1 and log-prob -inf)."""
    table = pa.ipc.open_stream(content).read_all()
    info = DatasetInfo.model_validate_json(table.schema.metadata[PARQUET_METADATA_KEY])
    if info.sampled is not None:
        # Draws are no log-probs: the on-policy divergences need the teacher's own.
        raise ValueError(
            "the teacher service stores sampled draws (--sampled-draws), not log-probs;"
            " on-policy training needs a server without --sampled-draws"
        )
    batch = decode_table(table, info)
    call = ScoreCall(info=info)
    out = []
    for i, row in enumerate(table.select(["cached", "score_logprobs"]).to_pylist()):
        # Positions from logprob_start; keep those that predict completion tokens.
        scored = batch.row_completion_positions(i)
        skip = scored.start - batch.row_positions(i).start
        scores = row["score_logprobs"]
        n = len(batch.row_completion(i))
        if row["cached"]:
            call.cached_tokens += n
        else:
            call.scored_tokens += n
        out.append(
            ScoredSequence(
                key=batch.keys[i],
                topk_ids=batch.topk_ids[scored].astype(np.int64),
                topk_logprobs=batch.topk_logprobs[scored].astype(np.float32),
                tail_logprob=batch.tail_logprob[scored],
                score_logprobs=None if scores is None else _padded(scores)[skip:],
                cached=bool(row["cached"]),
                token_logprob=batch.token_logprob[scored].astype(np.float32),
            )
        )
    return out, call


def _padded(rows: list[list[float]]) -> np.ndarray:
    """Per-position score log-probs as [C, s]: lists of different lengths (a request may
    ask a different number of ids per position) padded with -inf to the longest."""
    out = np.full((len(rows), max(map(len, rows), default=0)), -np.inf, dtype=np.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
