"""Held-out evaluation: KL to the teacher, top-1 agreement with it, CE on its tokens.

Each rank evaluates its share of the held-out rows and the sums are reduced. Under FSDP
every forward is a collective, so ranks step in lockstep: a rank that has run out of rows
repeats its first batch and discards the result until all have finished.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch

from .batching import Batch
from .distributed import DistEnv, all_reduce_max, all_reduce_sum


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
    ``sparse_kd.chunked_head_metrics``). Keys: ``eval/kl`` (forward KL at T=1 on the
    top-k plus tail bucket; 0 without a teacher), ``eval/top1``, ``eval/ce``,
    ``eval/tokens``.
    """
    totals = torch.zeros(4, dtype=torch.float64, device=env.device)
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
                totals += forward(batch).to(totals)
    all_reduce_sum(totals, env)
    kl, agree, ce, count = totals.tolist()
    count = max(count, 1.0)
    return {
        "eval/kl": kl / count,
        "eval/top1": agree / count,
        "eval/ce": ce / count,
        "eval/tokens": totals[3].item(),
    }
