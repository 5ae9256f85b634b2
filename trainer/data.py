"""Which data a run trains and evaluates on, opened and checked before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from .config import TrainConfig
from .seq_kd import SeedFileSource, is_seed_file
from .stream import ShardSource, Source, split_held_out
from .student import check_tokenizer


@dataclass
class RunData:
    """The training source and units, and the held-out source and units (maybe none).
    An on-policy-only run without ``data`` has no training source, and a held-out source
    only when ``eval_data`` is a dataset (held-out prompts are ``onpolicy``'s).
    ``sampled``: the training data holds sampled draws (RS-KD), not a top-k."""

    source: Source | None
    train_units: list[Any]
    eval_source: Source | None
    eval_units: list[Any]
    sampled: bool = False


def open_source(
    path: str, tokenizer: PreTrainedTokenizerBase, student: str, *, teacher: bool
) -> Source:
    """A seed file or a shard dataset (checked against ``tokenizer``, named ``student``)."""
    if is_seed_file(path):
        return SeedFileSource(path, tokenizer)
    source = ShardSource(path, with_teacher=teacher)
    check_tokenizer(tokenizer, student, source.info)
    return source


def open_data(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> RunData:
    """Open ``data`` (and ``eval_data``), check the student's tokenizer against shards.
    Without ``data`` (an on-policy-only run) only an ``eval_data`` dataset is opened; a
    prompt file there is ``onpolicy.load_prompts``'.

    Must run before a pad token is added to ``tokenizer``: the check hashes its specials.
    Evaluation always reads the teacher's top-k when the data has it, so an SFT run is
    measured by the same KL to the teacher as a KD run.
    """
    if config.data is None:
        if config.eval_data is None or is_seed_file(config.eval_data):
            return RunData(None, [], None, [])
        eval_source = open_source(config.eval_data, tokenizer, config.student, teacher=True)
        return RunData(None, [], eval_source, eval_source.units())
    if is_seed_file(config.data) and config.loss != "sft":
        raise ValueError(
            f"{config.data} is a seed file: it holds the teacher's text but no log-probs, so "
            f"only --loss sft can train on it (run the teacher over it for --loss {config.loss})"
        )
    source = open_source(config.data, tokenizer, config.student, teacher=config.loss != "sft")
    sampled = isinstance(source, ShardSource) and source.info.sampled is not None
    if (
        sampled
        and config.loss != "sft"
        and (config.loss != "forward_kl" or config.temperature != 1)
    ):
        drawn = source.info.sampled
        raise ValueError(
            f"{config.data} holds sampled draws ({drawn.draws} per position from the teacher at"
            f" temperature {drawn.temperature:g}), whose unbiased loss is forward KL at the"
            f" student's temperature 1: use --loss forward_kl --temperature 1 (or sft), not"
            f" --loss {config.loss} --temperature {config.temperature:g}"
        )
    train_units, held = split_held_out(source.units(), config.eval_fraction, source.unit_name)
    eval_source = source
    if isinstance(source, ShardSource) and not source.with_teacher:
        eval_source = ShardSource(config.data, with_teacher=True)
    if config.eval_data is not None:
        eval_source = open_source(config.eval_data, tokenizer, config.student, teacher=True)
        held = eval_source.units()
    return RunData(source, train_units, eval_source, held, sampled)
