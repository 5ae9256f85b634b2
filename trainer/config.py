"""``TrainConfig``: every setting of a training run, in one place.

The ``distill train`` flags are generated from these fields (``--field-name``, help from
the description) and a config file (TOML or YAML) uses the field names as keys, so the
two cannot drift apart. Precedence: defaults < config file < flags.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# The names of the losses and tail modes, here rather than in losses.py so that the CLI
# (which reads this module to build its flags) starts without importing torch.
TailMode = Literal["renormalize", "bucket"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd"]
LossName = Literal["forward_kl", "reverse_kl", "jsd", "tvd", "sft"]

APPROXIMATION_NOTE = (
    "reverse_kl and jsd over a cached top-k are approximations: the cache cannot rate "
    "tokens outside the teacher's top-k that the student puts mass on"
)


class TrainConfig(BaseModel):
    """A training run. Field descriptions double as the CLI's help text."""

    model_config = ConfigDict(extra="forbid")

    # Data and models.
    data: str | None = Field(
        None,
        description="Training data: a shard dataset directory or s3:// URI (token-level KD, "
        "or SFT on its completions with --loss sft), or a seed file (.jsonl, .jsonl.zst, "
        ".parquet) of {question, teacher_solution} rows for SFT. Required except in an "
        "on-policy-only run (--on-policy-fraction 1 with --prompts).",
    )
    student: str = Field(description="Student model: a Hugging Face id or a local directory.")
    output_dir: str = Field(description="Where checkpoints, the final model and metrics go.")
    eval_data: str | None = Field(
        None,
        description="Held-out data (same kinds as --data); in a run without --data, a shard "
        "dataset or a prompt file of held-out prompts (the student samples, the teacher "
        "scores).",
    )
    eval_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Hold out this fraction of --data's row groups (without --data: of "
        "--prompts' prompts).",
    )

    # Loss.
    loss: LossName = Field(
        "forward_kl",
        description="forward_kl | reverse_kl | jsd (generalized JSD(beta), GKD) | tvd | sft "
        f"(hard labels only: sequence-level KD). Note: {APPROXIMATION_NOTE}.",
    )
    beta: float = Field(
        0.5, ge=0.0, le=1.0, description="JSD(beta) mixing: 0 is forward KL, 1 reverse KL."
    )
    temperature: float = Field(
        1.0, gt=0.0, description="Distillation temperature T; the divergence is scaled by T^2."
    )
    alpha: float = Field(
        0.0, ge=0.0, le=1.0, description="Weight of the hard-label cross-entropy term."
    )
    tail: TailMode = Field(
        "bucket",
        description="Mass outside the teacher's top-k: 'bucket' keeps it as one extra outcome "
        "(keeps the total right), 'renormalize' drops it and renormalizes both sides on the "
        "top-k.",
    )

    # On-policy distillation (GKD): the student's own samples, scored by a live teacher.
    on_policy_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Each step is on-policy with this probability (seeded): the student "
        "samples completions of prompts and the teacher scores them (--teacher-url). 0: "
        "shards only; 1: the student's own samples only.",
    )
    on_policy_warmup_steps: int = Field(
        0,
        ge=0,
        description="The first N steps read --data only (off-policy), so that the student "
        "samples once it has learnt from the shards; on_policy_fraction applies after them.",
    )
    teacher_url: str | None = Field(
        None,
        description="Teacher service for on-policy steps (token from DISTILL_AUTH_TOKEN).",
    )
    prompts: str | None = Field(
        None,
        description="Prompt file for on-policy steps (the input formats distill cache "
        "accepts); default: the prompts of --data. With --on-policy-fraction 1 it replaces "
        "--data.",
    )
    sample_temperature: float = Field(
        1.0, gt=0.0, description="The student's sampling temperature on on-policy steps."
    )
    sample_top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="The student's nucleus (top-p) on on-policy steps."
    )
    sample_max_new_tokens: int = Field(
        64, gt=0, description="Most tokens the student samples per on-policy completion."
    )
    score_top: int = Field(
        8,
        ge=0,
        description="The student's own top-N ids per position whose exact teacher log-probs "
        "are asked (score_ids); the loss runs on their union with the teacher's top-k. Across "
        "tokenizers: those with a teacher token of identical bytes, where a position is the "
        "same text on both sides.",
    )
    teacher_k: int | None = Field(
        None, ge=1, description="Teacher top-k on on-policy steps (default: the server's)."
    )
    on_policy_dataset: str | None = Field(
        None,
        description="Dataset on the teacher that keeps every scored sample (default: "
        "onpolicy-<name of output_dir>).",
    )
    # Cross-tokenizer distillation (a student whose tokenizer differs from the teacher's).
    cross_tokenizer: bool = Field(
        False,
        description="Distil across tokenizers: the cached completions are retokenized for the "
        "student and compared chunk by chunk (spans both tokenizers cut at); matched "
        "vocabulary through --loss, the rest by sorted-probability L1 (ULD). With --loss sft: "
        "SFT on the retokenized teacher text. On-policy steps send the student's sampled text "
        "to the teacher in the teacher's tokenization and align it the same way. Padded "
        "batches only (no --packing).",
    )
    alm_weight: float = Field(
        0.0,
        ge=0.0,
        description="Cross-tokenizer only: weight of the chunk-likelihood term (ALM, binary KL "
        "between the teacher's and the student's probability of each chunk's text).",
    )
    teacher_tokenizer: str | None = Field(
        None,
        description="Cross-tokenizer only: where to load the teacher's tokenizer from (default: "
        "the path or id the dataset names); checked against the dataset's tokenizer hash.",
    )
    vocab_map_dir: str = Field(
        ".cache/vocab-maps",
        description="Cross-tokenizer only: where the teacher-to-student vocabulary map of each "
        "tokenizer pair is cached.",
    )

    # Batches.
    batch_size: int = Field(
        8, gt=0, description="Sequences per micro-batch per rank (rows when packing)."
    )
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_length: int = Field(2048, gt=1, description="Longest input; longer completions are cut.")
    packing: bool = Field(False, description="Pack sequences into rows of --max-length.")
    shuffle_window: int = Field(
        1024, gt=0, description="Rows shuffled together (memory: window x tokens x k x 8 B)."
    )
    seed: int = Field(0, description="Seed of the data order and of torch.")

    # Optimization.
    lr: float = Field(2e-5, gt=0.0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (matrices only).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps before cosine decay.")
    min_lr_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="Cosine decays to this fraction of --lr."
    )
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0: off).")
    max_steps: int = Field(1000, gt=0, description="Optimizer steps of the whole run.")

    # Memory, precision, distribution.
    chunk_size: int = Field(
        512, gt=0, description="Positions per chunk of the student's output head."
    )
    bf16: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: ddp, or fsdp for students that do not fit a device."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if present.")

    # Bookkeeping.
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: at the end only).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: at the end only).")
    log_every: int = Field(10, gt=0, description="Log training metrics every N steps.")
    resume: str | None = Field(
        None, description="Resume from a checkpoint directory, or 'auto' for the latest one."
    )
    overwrite: bool = Field(
        False,
        description="Start over in an --output-dir that already holds a run (its checkpoints, "
        "metrics and model are deleted); without it, such a directory needs --resume.",
    )
    stop_at_step: int | None = Field(
        None,
        gt=0,
        description="End this invocation after this step, with a checkpoint, keeping the "
        "schedule of --max-steps (for time-limited job slots; resume later).",
    )
    record_keys: bool = Field(
        False, description="Write the key of every row each rank trains on to keys-rank<N>.txt."
    )
    progress: bool = Field(True, description="Show a progress bar.")
    tensorboard: bool = Field(True, description="Write TensorBoard events to output_dir/tb.")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.stop_at_step is not None and self.stop_at_step > self.max_steps:
            raise ValueError(f"stop_at_step {self.stop_at_step} is past max_steps {self.max_steps}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceed max_steps {self.max_steps}")
        if self.eval_data is not None and self.eval_fraction > 0:
            raise ValueError("give eval_data or eval_fraction, not both")
        if self.data is None:
            self._check_without_data()
        if self.on_policy_fraction > 0:
            if self.teacher_url is None:
                raise ValueError("on_policy_fraction > 0 needs teacher_url (a distill serve URL)")
            if self.loss == "sft":
                raise ValueError("on-policy steps need a divergence loss, not sft")
            if self.sample_max_new_tokens >= self.max_length:
                raise ValueError(
                    f"sample_max_new_tokens {self.sample_max_new_tokens} leaves no room for a "
                    f"prompt in max_length {self.max_length}"
                )
        if self.cross_tokenizer and self.packing:
            raise ValueError("cross_tokenizer batches are padded; drop packing")
        return self

    def _check_without_data(self) -> None:
        """A run without ``data`` trains on the student's own samples of a prompt file only:
        every other step, and the shard-derived checks, need a dataset."""
        if self.on_policy_fraction < 1:
            raise ValueError(
                f"data is missing: on_policy_fraction {self.on_policy_fraction} leaves "
                "off-policy steps, which read it (only on_policy_fraction 1 with prompts "
                "trains without data)"
            )
        if self.prompts is None:
            raise ValueError(
                "prompts is missing: an on-policy-only run without data samples the prompts "
                "of a prompt file (give prompts, or data to sample its prompts)"
            )
        if self.on_policy_warmup_steps > 0:
            raise ValueError("data is missing: on_policy_warmup_steps train off-policy, on data")
        if self.cross_tokenizer:
            raise ValueError("data is missing: cross_tokenizer runs align a dataset's text")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True)


# Fields that fix the data order: resuming with any of them changed cannot be exact.
DATA_ORDER_FIELDS = (
    "data",
    "eval_fraction",
    "batch_size",
    "grad_accum",
    "max_length",
    "packing",
    "shuffle_window",
    "seed",
    "on_policy_fraction",
    "on_policy_warmup_steps",
    "prompts",
    "cross_tokenizer",
)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file, as a dict.

    Keys are ``TrainConfig`` field names; dashes are accepted for underscores so that a
    file can be written with the flags' spelling.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".toml":
        raw = tomllib.loads(path.read_text())
    elif suffix in (".yaml", ".yml"):
        raw = yaml.safe_load(path.read_text()) or {}
    else:
        raise ValueError(f"{path}: config files are .toml, .yaml or .yml")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a table of settings at the top level")
    return {key.replace("-", "_"): value for key, value in raw.items()}


def load_config(file: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Merge defaults, a config file and flag values (None means "flag not given")."""
    values = read_config_file(file) if file is not None else {}
    values.update({key: value for key, value in overrides.items() if value is not None})
    return TrainConfig(**values)
