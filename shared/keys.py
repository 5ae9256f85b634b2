"""Content keys: the same request to the same teacher always gets the same key.

The key is sha256 over a canonical JSON encoding (sorted keys, no whitespace, ids as
integers) of everything that changes the teacher's answer: the teacher's identity (its
weights, by content), the numerics it ran with (backend and dtype: the same weights in
bf16 or through another kernel give other log-probs), the tokenizer's vocabulary hash,
the exact prompt token ids after the chat template, the mode, the completion ids when
scoring, k, and the sampling parameters (normalised by the caller: a greedy request has
no seed). Fields that do not change the answer (a request id, whether to store it, the
path a model was loaded from) are deliberately left out, so that the teacher never runs
twice for one answer. The log-prob codec is not in the key either: rows of any codec
answer a request whose codec is no more exact than theirs (the store checks that). Nor is
the adaptive-k rule: it says which of the teacher's top-k entries a dataset keeps, and a
row answers a store whose rule keeps no more than its own (``schema.adaptive_answers``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

Mode = Literal["generate", "score"]

# 2: the teacher by content and its numerics (backend, dtype) instead of model + revision.
KEY_VERSION = 2


def cache_key(
    *,
    teacher: str,
    numerics: str,
    tokenizer_hash: str,
    prompt_ids: Sequence[int],
    mode: Mode,
    k: int,
    sampling: Mapping[str, Any],
    completion_ids: Sequence[int] | None = None,
) -> str:
    """Hex sha256 of the request. ``completion_ids`` is required to score, refused to generate."""
    if mode == "score" and completion_ids is None:
        raise ValueError("scoring needs completion_ids")
    if mode == "generate" and completion_ids is not None:
        raise ValueError("generation takes no completion_ids")
    if mode not in ("generate", "score"):
        raise ValueError(f"mode must be 'generate' or 'score', got {mode!r}")
    payload = {
        "v": KEY_VERSION,
        "teacher": teacher,
        "numerics": numerics,
        "tokenizer": tokenizer_hash,
        "prompt": [int(t) for t in prompt_ids],
        "mode": mode,
        "completion": None if completion_ids is None else [int(t) for t in completion_ids],
        "k": int(k),
        "sampling": {name: sampling[name] for name in sorted(sampling)},
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of a tokenizer's vocabulary (token -> id) and its special tokens.

    Two tokenizers with the same hash map every text to the same ids, which is what the
    trainer needs to check before it reads a teacher's ids as its own.
    """
    vocab = tokenizer.get_vocab()
    specials = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    blob = json.dumps(
        {"vocab": sorted(vocab.items(), key=lambda kv: kv[1]), "special": specials},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()
