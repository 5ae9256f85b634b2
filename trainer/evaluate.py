"""Held-out evaluation: KL to the teacher, top-1 agreement with it, CE on its tokens.

During training each rank evaluates its share of the held-out rows and the sums are
reduced. Under FSDP every forward is a collective, so ranks step in lockstep: a rank that
has run out of rows repeats its first batch and discards the result until all have
finished. ``evaluate_model`` measures any saved model (a teacher, an untrained student,
a checkpoint) on a dataset the same way, in one process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from distillcache.shared.inputs import ensure_pad_token

from .aligned_data import (
    AlignedShardSource,
    Retokenizer,
    iter_aligned_batches,
    load_teacher_tokenizer,
)
from .batching import Batch, iter_batches
from .cross_tokenizer import cross_spec
from .data import open_source
from .distributed import DistEnv, all_reduce_max, all_reduce_sum, pick_device
from .sparse_kd import LossSpec
from .stream import DataPosition, ShardSource, iter_held_out
from .student import DistillStudent, load_student, load_tokenizer
from .token_alignment import VocabMap


def evaluate(
    forward: Callable[[Batch], torch.Tensor],
    batches: Iterable[Batch],
    env: DistEnv,
    *,
    lockstep: bool,
    autocast: Callable[[], AbstractContextManager],
) -> dict[str, float]:
    """Per-token means over every rank's held-out rows.

    ``forward(batch)`` returns [KL sum, agreements, CE sum, positions] (see
    ``sparse_kd.chunked_head_metrics``), and for a cross-tokenizer student also the
    completions' UTF-8 bytes. Keys: ``eval/kl`` (forward KL at T=1 on the top-k plus tail
    bucket; 0 without a teacher; across tokenizers the chunk divergence of
    ``cross_tokenizer`` at T=1), ``eval/top1``, ``eval/ce``, ``eval/tokens``, and where
    bytes are known ``eval/bpb``: the student's bits per byte of the teacher's completion
    text, ``CE sum / ln 2 / bytes``, which does not depend on the tokenizer. Batches of the
    student's own samples (held-out prompts of an on-policy-only run) also give
    ``eval/reverse_kl``, the teacher-scored reverse KL on them (``DistillStudent``).
    """
    totals = torch.zeros(6, dtype=torch.float64, device=env.device)
    on_policy = False
    filler: Batch | None = None
    source = iter(batches)
    with torch.no_grad():
        while True:
            batch = next(source, None)
            if lockstep:
                more = torch.tensor([float(batch is not None)], device=env.device)
                if all_reduce_max(more, env).item() == 0:
                    break
                if batch is None:
                    if filler is None:
                        raise ValueError(
                            f"rank {env.rank} has no held-out rows; FSDP evaluation needs at "
                            "least one per rank"
                        )
                    with autocast():
                        forward(filler)
                    continue
                filler = filler or batch
            elif batch is None:
                break
            batch = batch.to(env.device)
            with autocast():
                sums = forward(batch).to(totals)
            totals[: len(sums)] += sums
            on_policy = on_policy or len(sums) == len(totals)
    all_reduce_sum(totals, env)
    kl, agree, ce, count, n_bytes, reverse_kl = totals.tolist()
    count = max(count, 1.0)
    result = {
        "eval/kl": kl / count,
        "eval/top1": agree / count,
        "eval/ce": ce / count,
        "eval/tokens": totals[3].item(),
    }
    if n_bytes > 0:
        result["eval/bpb"] = ce / math.log(2) / n_bytes
    if on_policy:
        result["eval/reverse_kl"] = reverse_kl / count
    return result


def evaluate_model(
    model: str | Path,
    data: str | Path,
    *,
    max_length: int = 2048,
    batch_size: int = 8,
    chunk_size: int = 512,
    device: str = "auto",
    bf16: bool = True,
    cross_tokenizer: bool = False,
    teacher_tokenizer: str | None = None,
    vocab_map_dir: str | Path = ".cache/vocab-maps",
) -> dict[str, float]:
    """The held-out metrics of ``evaluate`` for a saved model over all of ``data``.

    ``model``: anything ``from_pretrained`` loads whose tokenizer matches the shards (the
    teacher itself, a student before or after training), or, with ``cross_tokenizer``,
    a model of any tokenizer (the completions are retokenized and aligned as in
    training; the metrics then include ``eval/bpb``). ``data``: a shard dataset (all
    metrics) or a seed file (CE only). One process; bf16 autocast on CUDA when ``bf16``.
    """
    env = DistEnv(rank=0, world=1, local_rank=0, device=pick_device(device))
    tokenizer = load_tokenizer(str(model))
    cross = None
    if cross_tokenizer:
        info = ShardSource(data).info
        teacher = load_teacher_tokenizer(info, teacher_tokenizer)
        vocab_map = VocabMap.load_or_build(teacher, tokenizer, vocab_map_dir)
        source = AlignedShardSource(data, Retokenizer(teacher, tokenizer, vocab_map))
    else:
        source = open_source(str(data), tokenizer, str(model), teacher=True)
    ensure_pad_token(tokenizer)
    spec = LossSpec(vocab_size=len(tokenizer), chunk_size=chunk_size)
    if cross_tokenizer:
        cross = cross_spec(spec, vocab_map)
    student = load_student(str(model), len(tokenizer))
    module = DistillStudent(student, spec, cross).to(env.device).eval()
    rows = (
        (example, DataPosition())
        for example in iter_held_out(source, source.units(), rank=0, world=1)
    )
    if cross_tokenizer:
        batches = iter_aligned_batches(
            rows, batch_size=batch_size, max_length=max_length, pad_id=tokenizer.pad_token_id
        )
    else:
        batches = iter_batches(
            rows,
            batch_size=batch_size,
            max_length=max_length,
            pad_id=tokenizer.pad_token_id,
            packing=False,
        )

    def autocast() -> AbstractContextManager:
        if env.device.type == "cuda" and bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    return evaluate(
        lambda batch: module(batch, evaluate=True),
        (batch for batch, _ in batches),
        env,
        lockstep=False,
        autocast=autocast,
    )
