"""The shard contract, declared once: columns, their Arrow types and encodings, and metadata.

Both halves of distillcache (teacher and trainer) import this module; neither re-declares
a column. A dataset is a directory with ``.manifest.json`` and ``*.parquet`` shards, one row
per sequence (the manifest's name starts with a dot so that every Parquet reader opens the
directory as a dataset as it is). The scored arrays of a row (``topk_*``,
``token_logprob``, ``tail_logprob``) cover the positions ``logprob_start .. len(prompt_ids) + len(completion_ids) - 1`` of the
sequence ``prompt_ids + completion_ids``: entry j is the teacher's distribution over token
``logprob_start + j`` given every token before it. For generated or scored completions
``logprob_start == len(prompt_ids)``, so entry j is about completion token j.
``request`` is the JSON of the request that made the row (mode, k, sampling parameters:
what the cache key covers); ``meta`` is the JSON of the input row's own fields.

A dataset of sampled sparse logits (``DatasetInfo.sampled``, RS-KD) stores, in place of
``topk_*`` and ``tail_logprob``, per scored position the distinct ids drawn from the
teacher (``sample_ids``, ascending) and how often each was drawn (``sample_counts``, one
byte each, summing to the draw count N). In memory (``SequenceRecord``, the reader's
``DecodedBatch``, the trainer's ``Example``) such a position is the draws' empirical
distribution in top-k form: the ids, log-probs ``ln(count / N)``, padding (id -1,
log-prob -inf) up to N entries, and a tail of -inf (the draws hold all the mass), so
every consumer keeps one type whatever the dataset's mode.

See docs/shard-format.md for why the columns are encoded the way they are.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# 2: the manifest is ``.manifest.json`` (was ``manifest.json``), shards carry page
# checksums and self-describing field metadata, and a dataset may keep a variable number
# of entries per position (adaptive k). Version-1 datasets still read.
# 3: a dataset of sampled sparse logits stores ``sample_ids``/``sample_counts`` instead of
# ``topk_*``/``tail_logprob``. Only such a dataset is version 3 (``layout_version``): a
# top-k dataset's layout is version 2's, unchanged, so it keeps that number; version-2
# datasets then still take appends, older readers still read new top-k datasets, and an
# older reader refuses a sampled dataset by its version instead of misreading it.
SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)


def layout_version(sampled: bool) -> int:
    """The schema version a dataset of this kind is written with (see SCHEMA_VERSION)."""
    return 3 if sampled else 2


KEY = "key"
PROMPT_IDS = "prompt_ids"
COMPLETION_IDS = "completion_ids"
COMPLETION_TEXT = "completion_text"
LOGPROB_START = "logprob_start"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
TOKEN_LOGPROB = "token_logprob"
TAIL_LOGPROB = "tail_logprob"
SAMPLE_IDS = "sample_ids"
SAMPLE_COUNTS = "sample_counts"
FINISH_REASON = "finish_reason"
REQUEST = "request"
META = "meta"

COLUMNS = (
    KEY,
    PROMPT_IDS,
    COMPLETION_IDS,
    COMPLETION_TEXT,
    LOGPROB_START,
    TOPK_IDS,
    TOPK_LOGPROBS,
    TOKEN_LOGPROB,
    TAIL_LOGPROB,
    FINISH_REASON,
    REQUEST,
    META,
)
# A sampled dataset's columns: the draws in place of the top-k and its tail.
SAMPLED_COLUMNS = (
    KEY,
    PROMPT_IDS,
    COMPLETION_IDS,
    COMPLETION_TEXT,
    LOGPROB_START,
    SAMPLE_IDS,
    SAMPLE_COUNTS,
    TOKEN_LOGPROB,
    FINISH_REASON,
    REQUEST,
    META,
)

LogprobCodec = Literal["cbrt-u8", "float16", "float32"]


# Parquet key-value metadata key holding the JSON of DatasetInfo.
PARQUET_METADATA_KEY = b"distillcache"

if TYPE_CHECKING:
    import pyarrow as pa

# How to turn each codec's stored numbers ``x`` into natural-log probabilities: in words,
# and as a DuckDB SQL expression over ``x`` (tests evaluate the SQL against the reader).
CODEC_DECODE: dict[str, tuple[str, str]] = {
    "cbrt-u8": (
        "one-byte code x of p ** (1/3): logprob = 3 * ln(max(x, 0.25) / 255)",
        "3 * ln(greatest(x, 0.25) / 255)",
    ),
    "float16": ("log-probs as float16: logprob = x", "x"),
    "float32": ("log-probs as float32: logprob = x", "x"),
}
# From most to least exact: a dataset's values are as exact as the last codec in this
# order they went through (see DatasetInfo.precision).
CODEC_EXACTNESS: tuple[str, ...] = ("float32", "float16", "cbrt-u8")


def as_exact_codecs(codec: LogprobCodec) -> tuple[str, ...]:
    """The precisions at least as exact as ``codec``'s: a row from a dataset whose values
    are that exact (``DatasetInfo.exact_as``) may answer a request for ``codec`` (it is then
    re-encoded, and its metadata stays true)."""
    return CODEC_EXACTNESS[: CODEC_EXACTNESS.index(codec) + 1]


TOPK_ORDER_NOTE = (
    "ids sorted ascending within each position, not by probability; order a position by"
    " its topk_logprobs to get the top-1 first"
)


SAMPLE_ORDER_NOTE = "the distinct ids drawn at a position, sorted ascending"


def sample_decode(draws: int) -> tuple[str, str]:
    """How to read ``sample_counts`` of a dataset of ``draws`` draws per position: in
    words, and as a DuckDB SQL expression over ``x``."""
    return (
        f"how many of the {draws} draws at a position gave the id at the same place in"
        f" sample_ids (they sum to {draws}); the draws' empirical distribution is"
        f" p = x / {draws}, logprob = ln(x / {draws})",
        f"ln(x / {draws})",
    )


def shard_schema(
    k: int,
    codec: LogprobCodec,
    *,
    adaptive: bool = False,
    sampled: SampledLogits | None = None,
) -> pa.Schema:
    """The Arrow schema of a shard holding top-``k`` log-probs stored with ``codec``.

    With ``adaptive`` (a dataset with ``DatasetInfo.adaptive``) each position holds its own
    number of entries, 1..k: ``topk_ids`` and ``topk_logprobs`` are lists of variable
    lists instead of lists of fixed-size lists. ``topk_ids`` and ``topk_logprobs`` carry
    field metadata (``order``; ``codec``, ``decode`` and ``decode_sql``) so that a shard
    explains itself in any Arrow reader. With ``sampled`` the shard holds the draws
    instead (``SAMPLED_COLUMNS``): ``sample_ids`` list<list<int32>> and ``sample_counts``
    list<list<uint8>>, one variable list per position, with the same kind of field
    metadata; ``k`` and ``codec`` are then unused.
    """
    # Imported here: the teacher's backends import this module (Sampling, DatasetInfo)
    # and must load where pyarrow is not installed (scripts/gpu_check.sh's wheel folder).
    import pyarrow as pa

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    lp_type = {"cbrt-u8": pa.uint8(), "float16": pa.float16(), "float32": pa.float32()}[codec]
    words, sql = CODEC_DECODE[codec]

    def entries(t: pa.DataType) -> pa.DataType:
        return pa.list_(pa.list_(t) if adaptive or sampled else pa.list_(t, k))

    head = [
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(PROMPT_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(COMPLETION_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(COMPLETION_TEXT, pa.string()),
        pa.field(LOGPROB_START, pa.int32(), nullable=False),
    ]
    foot = [
        pa.field(FINISH_REASON, pa.string()),
        pa.field(REQUEST, pa.string()),
        pa.field(META, pa.string()),
    ]
    token = pa.field(TOKEN_LOGPROB, pa.list_(pa.float32()), nullable=False)
    if sampled is not None:
        count_words, count_sql = sample_decode(sampled.draws)
        draws = [
            pa.field(
                SAMPLE_IDS,
                entries(pa.int32()),
                nullable=False,
                metadata={"order": SAMPLE_ORDER_NOTE},
            ),
            pa.field(
                SAMPLE_COUNTS,
                entries(pa.uint8()),
                nullable=False,
                metadata={"decode": count_words, "decode_sql": count_sql},
            ),
        ]
        return pa.schema([*head, *draws, token, *foot])
    return pa.schema(
        [
            *head,
            pa.field(
                TOPK_IDS,
                entries(pa.int32()),
                nullable=False,
                metadata={"order": TOPK_ORDER_NOTE},
            ),
            pa.field(
                TOPK_LOGPROBS,
                entries(lp_type),
                nullable=False,
                metadata={"codec": codec, "decode": words, "decode_sql": sql},
            ),
            token,
            pa.field(TAIL_LOGPROB, pa.list_(pa.float32()), nullable=False),
            *foot,
        ]
    )


def shard_metadata(info: DatasetInfo) -> dict[bytes, bytes]:
    """File-level key-value metadata of every shard: the DatasetInfo and the decoding.

    The codec and its formula are repeated under plain keys so that tools that show only
    file metadata (``duckdb.parquet_kv_metadata``, ``pq.read_metadata``) show them.
    """
    if info.sampled is not None:
        words, sql = sample_decode(info.sampled.draws)
        return {
            PARQUET_METADATA_KEY: info.to_json().encode(),
            b"distillcache.sample_counts.decode": words.encode(),
            b"distillcache.sample_counts.decode_sql": sql.encode(),
            b"distillcache.sample_ids.order": SAMPLE_ORDER_NOTE.encode(),
            b"distillcache.sampled": info.sampled.model_dump_json().encode(),
        }
    words, sql = CODEC_DECODE[info.logprob_codec]
    return {
        PARQUET_METADATA_KEY: info.to_json().encode(),
        b"distillcache.topk_logprobs.codec": info.logprob_codec.encode(),
        b"distillcache.topk_logprobs.decode": words.encode(),
        b"distillcache.topk_logprobs.decode_sql": sql.encode(),
        b"distillcache.topk_ids.order": TOPK_ORDER_NOTE.encode(),
    }


def parquet_options(codec: LogprobCodec, *, sampled: bool = False) -> dict[str, Any]:
    """Per-column Parquet encodings for ``pq.ParquetWriter``, chosen by measurement.

    See docs/shard-format.md for the figures. Top-k ids are sorted within a position;
    BYTE_STREAM_SPLIT puts each byte of the ids in its own stream, so the high bytes (zero
    or nearly constant below a 16M vocabulary) compress away and zstd sees the low bytes'
    structure. One-byte log-prob codes are stored as INT32 by Parquet; BYTE_STREAM_SPLIT
    leaves their three zero bytes in streams zstd removes, and measured against dictionary
    encoding (which bit-packs them to 8 bits) it writes the column 22-30% faster at the same
    size (+-0.2%) and reads it as fast (SmolLM2 top-20/64, CPU time). Float32 columns use
    BYTE_STREAM_SPLIT
    (sign/exponent bytes compress, mantissa bytes do not); float16 log-probs use the plain
    encoding, because DuckDB reads BYTE_STREAM_SPLIT only for FLOAT, DOUBLE, INT32 and
    INT64. A sampled dataset's ``sample_ids`` and one-byte ``sample_counts`` take the
    top-k ids' and one-byte codes' encodings, for the same reasons.
    """
    dictionary = ["key", "finish_reason", "request"]
    if sampled:
        encodings = {
            f"{SAMPLE_IDS}.list.element.list.element": "BYTE_STREAM_SPLIT",
            f"{SAMPLE_COUNTS}.list.element.list.element": "BYTE_STREAM_SPLIT",
            f"{TOKEN_LOGPROB}.list.element": "BYTE_STREAM_SPLIT",
        }
        return {"use_dictionary": dictionary, "column_encoding": encodings}
    encodings = {
        f"{TOPK_IDS}.list.element.list.element": "BYTE_STREAM_SPLIT",
        f"{TOKEN_LOGPROB}.list.element": "BYTE_STREAM_SPLIT",
        f"{TAIL_LOGPROB}.list.element": "BYTE_STREAM_SPLIT",
    }
    if codec == "float16":
        encodings[f"{TOPK_LOGPROBS}.list.element.list.element"] = "PLAIN"
    else:
        encodings[f"{TOPK_LOGPROBS}.list.element.list.element"] = "BYTE_STREAM_SPLIT"
    return {"use_dictionary": dictionary, "column_encoding": encodings}


# Below this a nonzero temperature divides logits into overflow; 0 means greedy.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
# Sampling kernels run in float32: a smaller top_p rounds to 0 there and is refused.
MIN_TOP_P = 1e-6
# Seeds reach torch and vLLM as signed 64-bit integers.
MAX_SEED = 2**63 - 1


class Sampling(BaseModel):
    """How a generation picks its tokens: every field can change what the teacher produced.

    The one sampling type of distillcache: the HTTP bodies, batch jobs, the ``cache`` flags,
    the backends and the dataset metadata all use it. ``temperature`` 0 is greedy, and a
    greedy generation does not depend on ``top_p`` or ``seed``: ``normalized`` drops them,
    so the cache key of a greedy request ignores them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(256, ge=1, description="Longest generated completion, in tokens.")
    temperature: float = Field(
        0.0,
        ge=0.0,
        le=MAX_TEMPERATURE,
        allow_inf_nan=False,
        description=f"Sampling temperature: 0 is greedy; else {MIN_TEMPERATURE} to "
        f"{MAX_TEMPERATURE:g}.",
    )
    top_p: float = Field(
        1.0,
        ge=MIN_TOP_P,
        le=1.0,
        allow_inf_nan=False,
        description=f"Nucleus sampling mass, {MIN_TOP_P:g} to 1.",
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Sampling seed (none: a fresh draw per request)."
    )

    @field_validator("temperature")
    @classmethod
    def _greedy_or_safe(cls, value: float) -> float:
        if 0.0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {value}")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def as_sampling(self) -> Sampling:
        """Just the sampling, from a model that extends it (a request body, a job spec)."""
        return Sampling(**{name: getattr(self, name) for name in Sampling.model_fields})

    def normalized(self) -> Sampling:
        """The same sampling with the fields that cannot change its result reset."""
        plain = self.as_sampling()
        return plain.model_copy(update={"top_p": 1.0, "seed": None}) if self.greedy else plain


class AdaptiveK(BaseModel):
    """Per-position k, applied by the writer to a top-k capture (k = the most kept).

    In each position's entries, most likely first, the writer keeps the first ``n``:
    enough to reach kept probability ``mass`` and every entry of probability at least
    ``min_prob`` (either rule may be left out), and at least ``min_k``. The tail bucket
    (``tail_logprob``) carries the rest, recomputed exactly. ``min_prob`` is the rule
    that spends entries best for a given mean tail mass (it keeps the largest
    probabilities of the whole dataset); ``mass`` is the usual top-p.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mass: float | None = Field(None, gt=0.0, le=1.0)
    min_prob: float | None = Field(None, gt=0.0, lt=1.0)
    min_k: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _some_rule(self) -> AdaptiveK:
        if self.mass is None and self.min_prob is None:
            raise ValueError("adaptive k needs mass, min_prob or both")
        return self

    def covers(self, other: AdaptiveK) -> bool:
        """Whether this rule keeps, at every position, at least the entries ``other`` keeps.

        Each part of the rule only ever raises a position's count, and it does so
        monotonically in its parameter, so part by part is enough: at least ``other``'s
        ``min_k``, a ``mass`` at least ``other``'s, a ``min_prob`` at most ``other``'s
        (a part ``other`` leaves out asks for nothing). Cutting this rule's rows with
        ``other`` then gives what ``other`` keeps of the full top-k: the entries it drops
        were never among those.
        """
        return (
            self.min_k >= other.min_k
            and (other.mass is None or (self.mass is not None and self.mass >= other.mass))
            and (
                other.min_prob is None
                or (self.min_prob is not None and self.min_prob <= other.min_prob)
            )
        )


def adaptive_answers(stored: AdaptiveK | None, wanted: AdaptiveK | None) -> bool:
    """Whether rows stored under rule ``stored`` (None: every entry of the top-k) can
    answer a request for rule ``wanted`` (None: the full top-k): a full top-k answers any
    rule (cut on the way), a cut row only a rule it covers, never a full top-k."""
    if stored is None:
        return True
    return wanted is not None and stored.covers(wanted)


# Counts are stored in one byte each, so at most 255 draws per position.
MAX_DRAWS = 255


class SampledLogits(BaseModel):
    """Sampled sparse logits (RS-KD; Anshumann et al. 2025, "Sparse Logit Sampling"): at
    each scored position the teacher draws ``draws`` tokens, with replacement, from
    ``softmax(logits / temperature)`` over its whole vocabulary, and the dataset keeps the
    distinct ids and their counts. ``sum_i (c_i / N) f(x_i)`` is then an unbiased estimate
    of ``E_q[f]`` for the tempered teacher ``q``, which the trainer's loss relies on.

    ``seed_rule`` says where a row's draws come from, so that a recomputed row is
    bit-identical: ``cache-key``, a ``torch.Generator`` seeded with ``seed_for(key)`` (the
    row's cache key's first 16 hex digits, as an integer below 2**63), drawing the
    positions in order (``torch.multinomial`` over [positions, vocabulary]).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    draws: int = Field(ge=1, le=MAX_DRAWS, description="Draws per position (N).")
    temperature: float = Field(
        1.0,
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        allow_inf_nan=False,
        description="The teacher's softmax temperature the draws come from.",
    )
    seed_rule: Literal["cache-key"] = "cache-key"

    @staticmethod
    def seed_for(key: str) -> int:
        """The generator seed of the row whose cache key is ``key`` (a hex sha256)."""
        return int(key[:16], 16) & MAX_SEED


class DatasetInfo(BaseModel):
    """What a dataset holds and how it was made; stored in every shard and the manifest.

    A dataset has exactly one DatasetInfo: a writer refuses to append shards made by
    another teacher, tokenizer, k or codec, because the trainer must be able to mix any
    two rows of a dataset.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    teacher_model: str
    teacher_revision: str = "unknown"
    tokenizer: str
    tokenizer_hash: str
    vocab_size: int = Field(gt=0, description="Tokens the tokenizer knows.")
    logit_width: int = Field(gt=0, description="Width of the model's logits (may be padded).")
    k: int = Field(
        gt=0,
        description="Entries per position (with adaptive k: the most; sampled: the draws N).",
    )
    adaptive: AdaptiveK | None = None
    sampled: SampledLogits | None = Field(
        None, description="Sampled sparse logits (RS-KD) instead of the top-k: how drawn."
    )
    logprob_codec: LogprobCodec = "cbrt-u8"
    precision: LogprobCodec | None = Field(
        None,
        description="The least exact codec the stored values went through before this one"
        " (a cbrt-u8 dataset exported as float32 keeps cbrt-u8's numbers); None: only"
        " logprob_codec's own rounding.",
    )
    logprobs_mode: str = Field(
        "raw_logprobs", description="What was stored: the teacher's raw T=1 log-softmax."
    )
    sampling: Sampling | None = Field(
        None,
        description="The sampling of every generated row; None when it varies per request "
        "(live datasets): each row's request column holds its own.",
    )
    backend: str
    backend_version: str
    dtype: str = Field(
        "unknown", description="The dtype the teacher's weights ran in (float32, bfloat16...)."
    )

    @model_validator(mode="before")
    @classmethod
    def _layout_version(cls, value: Any) -> Any:
        """A DatasetInfo made without a schema version gets its layout's (SCHEMA_VERSION)."""
        if isinstance(value, dict) and "schema_version" not in value:
            value = {**value, "schema_version": layout_version(value.get("sampled") is not None)}
        return value

    @model_validator(mode="after")
    def _sampled_layout(self) -> DatasetInfo:
        """A sampled dataset stores draws: no adaptive rule, k is N, and the only stored
        log-probs (``token_logprob``) are float32."""
        if self.sampled is None:
            if self.schema_version > 2:
                raise ValueError(f"schema_version {self.schema_version} is a sampled dataset's")
            return self
        if self.adaptive is not None or self.k != self.sampled.draws:
            raise ValueError("a sampled dataset has no adaptive rule and k = its draws")
        if self.logprob_codec != "float32" or self.precision is not None:
            raise ValueError("a sampled dataset's only log-probs (token_logprob) are float32")
        if self.schema_version != 3:
            raise ValueError(f"a sampled dataset is schema version 3, not {self.schema_version}")
        return self

    @field_validator("sampling", mode="before")
    @classmethod
    def _legacy_sampling(cls, value: Any) -> Any:
        """Datasets written before ``Sampling`` existed stored ``{"per_request": true}``
        for live datasets and a looser sampling object; both still read."""
        if isinstance(value, dict):
            if value.get("per_request"):
                return None
            return {
                name: value[name] for name in Sampling.model_fields if value.get(name) is not None
            }
        return value

    def compatibility(self) -> dict[str, Any]:
        """The fields two writers of the same dataset must agree on: the same weights (by
        revision; the model id is only a label unless there is no revision), numerics
        (backend, dtype), tokenizer, k and its rule, codec and precision, and sampling, so
        every row's metadata stays true."""
        fields = {
            "schema_version",
            "teacher_revision",
            "tokenizer_hash",
            "vocab_size",
            "logit_width",
            "k",
            "adaptive",
            "sampled",
            "logprob_codec",
            "precision",
            "logprobs_mode",
            "backend",
            "dtype",
            "sampling",
        }
        if self.teacher_revision == "unknown":
            fields.add("teacher_model")
        return self.model_dump(include=fields)

    def schema(self) -> pa.Schema:
        """This dataset's shard schema."""
        return shard_schema(
            self.k, self.logprob_codec, adaptive=self.adaptive is not None, sampled=self.sampled
        )

    @property
    def exact_as(self) -> LogprobCodec:
        """The codec whose rounding bounds these values' exactness (for cache hits)."""
        return self.precision or self.logprob_codec

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)
