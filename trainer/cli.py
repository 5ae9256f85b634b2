"""``distill train``: flags generated from ``TrainConfig``, plus ``--config FILE``.

Each config field becomes ``--field-name`` (distillcache/flags.py), so flags, config
files and the Python API cannot disagree. Flags default to "not given" so that a config
file's value survives unless a flag overrides it.
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from distillcache.flags import flag, options

from .config import APPROXIMATION_NOTE, TrainConfig, load_config

HELP = (
    "Distil a student from a teacher-logit cache (or SFT on a seed file).\n\n"
    "Token-level KD reads the teacher's top-k log-probs from shards; --loss sft trains on "
    "the teacher's completions only (sequence-level KD). Run under torchrun or accelerate "
    "launch for several processes (DDP, or --distributed fsdp). Settings come from "
    "defaults, then --config (TOML or YAML, keys are the flag names), then flags.\n\n"
    f"Note: {APPROXIMATION_NOTE}; on-policy training scores the student's own tokens."
)


def config_flags() -> dict[str, str]:
    """Config field -> its flag, for every field of ``TrainConfig``."""
    return {name: flag(name) for name in TrainConfig.model_fields}


def train(config: Path | None = None, **flags: Any) -> None:
    from .loop import train as run_training

    try:
        settings = load_config(config, flags)
    except ValidationError as e:
        # A check across fields (the model's validator) has no field; its message names them.
        problems = "; ".join(
            f"{flag(str(err['loc'][0]))}: {err['msg']}"
            if err["loc"]
            else err["msg"].removeprefix("Value error, ")
            for err in e.errors()
        )
        raise typer.BadParameter(problems) from None
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    _preflight(settings)
    # transformers' own loading bars would interleave with the training progress bar.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    began = time.monotonic()
    result = run_training(settings)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary, not one per rank
        _summary(settings, result, time.monotonic() - began)


def _summary(settings: TrainConfig, result: Path, seconds: float) -> None:
    """The run in a few lines: what it did, where it ended, where everything is."""
    import json

    from rich.console import Console
    from rich.table import Table

    out = Path(settings.output_dir)
    metrics = out / "metrics.jsonl"
    records = (
        [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    )
    train = next((r for r in reversed(records) if "train/loss" in r), {})
    evals = next((r for r in reversed(records) if "eval/kl" in r), {})
    table = Table(show_header=False, box=None, pad_edge=False)
    rows = [
        ("steps", str(train.get("step", "-"))),
        ("last training loss", f"{train['train/loss']:.4f}" if train else "-"),
        ("held-out KL to the teacher", f"{evals['eval/kl']:.4f} nats/token" if evals else "-"),
        ("held-out top-1 agreement", f"{evals['eval/top1']:.3f}" if evals else "-"),
        ("held-out tokens", f"{int(evals['eval/tokens']):,}" if evals else "-"),
        *(
            [("held-out reverse KL, own samples", f"{evals['eval/reverse_kl']:.4f} nats/token")]
            if "eval/reverse_kl" in evals
            else []
        ),
        ("time", f"{seconds:.0f} s"),
        ("model", str(result)),
        (
            "metrics",
            f"{metrics} (and TensorBoard in {out / 'tb'})"
            if settings.tensorboard
            else str(metrics),
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console(stderr=True).print(table)


def _preflight(settings: TrainConfig) -> None:
    """What can be checked before the student loads (a ValueError, printed as one line)."""
    from distillcache import preflight
    from distillcache.shared.storage import is_uri

    from .seq_kd import is_seed_file

    preflight.model_ref(settings.student, "--student")
    for flag_name, path in (("--data", settings.data), ("--eval-data", settings.eval_data)):
        # A dataset on object storage is checked when it opens (its errors name the URI).
        if path is not None and not is_uri(path) and not Path(path).exists():
            raise ValueError(f"{flag_name} {path}: no such seed file or dataset directory")
    if settings.prompts is not None:
        preflight.prompt_file(settings.prompts, "--prompts")
    if settings.data is None:
        # An on-policy-only run: an --eval-data file holds held-out prompts.
        if settings.eval_data is not None and is_seed_file(settings.eval_data):
            preflight.prompt_file(settings.eval_data, "--eval-data")
    elif is_seed_file(settings.data) and settings.loss != "sft":
        raise ValueError(
            f"--data {settings.data} is a seed file: it holds the teacher's text but no "
            f"log-probs, so only --loss sft trains on it (run `distill cache` over it for "
            f"--loss {settings.loss})"
        )
    preflight.writable(Path(settings.output_dir), "--output-dir")
    _claim_output_dir(settings)


def _claim_output_dir(settings: TrainConfig) -> None:
    """A run never silently lands on another: an --output-dir holding a run needs --resume
    (continue it) or --overwrite (start over); one holding other files is refused.
    Under torchrun only rank 0 decides, before the process group forms."""
    import shutil

    out = Path(settings.output_dir)
    if settings.resume is not None or os.environ.get("RANK", "0") != "0":
        return
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / "train_config.json").is_file():
        raise ValueError(
            f"--output-dir {out}: holds files that are not a distill run; choose an empty "
            "or new directory"
        )
    if not settings.overwrite:
        raise ValueError(
            f"--output-dir {out}: already holds a run; --resume auto continues it, "
            "--overwrite starts over"
        )
    shutil.rmtree(out)


train.__doc__ = HELP
train.__signature__ = inspect.Signature(
    [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None,
                typer.Option(
                    "--config", "-c", help="TOML or YAML file of settings (flag names as keys)."
                ),
            ],
        ),
        *options(TrainConfig),
    ]
)
