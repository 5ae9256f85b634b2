"""Answers as Arrow IPC: the binary transport of ``/v1/score`` and ``/v1/generate``.

A client that sends ``Accept: application/vnd.apache.arrow.stream`` gets one Arrow IPC
stream instead of JSON. Its table is the shard schema (shared/schema.py), one row per
answer, built by the shard writer's own ``records_to_table`` (so log-probs travel in the
store's codec and each position's top-k in canonical id order, exactly as a shard holds
them), plus the answer's own columns:

- ``cached`` (bool) and ``dataset`` (string): as in the JSON answer;
- ``score_logprobs`` (list<list<float32>>, null when no score_ids were asked): per scored
  position, the log-probs at the pair's score_ids in the order given (-inf stays -inf).

The schema metadata holds the DatasetInfo JSON under the shard's key, so a reader knows
k and the codec without asking. Binary floats skip JSON's decimal round trip both ways:
bench/onpolicy.py measures bytes and encode/decode time per scored token against JSON.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from distillcache.shared.schema import PARQUET_METADATA_KEY, DatasetInfo
from distillcache.shared.writer import records_to_table

from .store import Answer

ARROW_STREAM = "application/vnd.apache.arrow.stream"


def wants_arrow(accept: str | None) -> bool:
    """Whether an Accept header asks for the Arrow stream (JSON stays the default)."""
    return accept is not None and ARROW_STREAM in accept


def encode_answers(answers: list[Answer], info: DatasetInfo) -> bytes:
    """One Arrow IPC stream holding ``answers`` (all of top-``info.k``; with adaptive k,
    each position's kept entries, as a shard of ``info`` holds them)."""
    schema = info.schema()
    table = records_to_table([a.record for a in answers], schema, info)
    scores = [getattr(a, "score_logprobs", None) for a in answers]
    table = (
        table.append_column("cached", pa.array([a.cached for a in answers], pa.bool_()))
        .append_column("dataset", pa.array([a.dataset for a in answers], pa.string()))
        .append_column("score_logprobs", _ragged(scores))
    )
    table = table.replace_schema_metadata({PARQUET_METADATA_KEY: info.model_dump_json()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _ragged(rows: list[list[np.ndarray] | None]) -> pa.Array:
    """list<list<float32>> from per-answer lists of per-position arrays (None: null)."""
    typ = pa.list_(pa.list_(pa.float32()))
    return pa.array(
        [None if r is None else [np.asarray(p, np.float32) for p in r] for r in rows], typ
    )
