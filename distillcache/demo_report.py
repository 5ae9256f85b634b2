"""The demo's report: report.md and the training curves, from typed figures.

demo.py runs the pipeline and measures; this file only renders what it measured, so the
report's wording can change without touching the pipeline, and every figure it shows
has a name and a type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .demo import DemoConfig


@dataclass(frozen=True)
class CacheFigures:
    """What caching the teacher cost, and what re-submitting the training job cost."""

    teacher_tokens: int
    seconds: float
    rows: int
    tokens: int
    bytes: int
    again_present: int
    again_teacher_tokens: int
    inspect_text: str


@dataclass(frozen=True)
class ModelScores:
    """One model on the held-out questions: distribution fidelity and final answers."""

    kl: float
    top1: float
    ce: float
    accuracy: float | None
    agreement: float | None


@dataclass(frozen=True)
class DemoResults:
    cache: CacheFigures
    scores: dict[str, ModelScores]
    step_seconds: dict[str, float]
    teacher_right: int
    total_seconds: float


def plot_curves(runs: dict[str, Path], path: Path) -> None:
    """Training loss and held-out KL against step, one line per student run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, run in runs.items():
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
        train = [r for r in records if "train/loss" in r]
        evals = [r for r in records if "eval/kl" in r]
        axes[0].plot([r["step"] for r in train], [r["train/loss"] for r in train], label=name)
        axes[1].plot([r["step"] for r in evals], [r["eval/kl"] for r in evals], "o-", label=name)
    axes[0].set(title="training loss (own objective)", xlabel="step")
    axes[1].set(title="held-out KL to the teacher (nats/token)", xlabel="step")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_report(cfg: DemoConfig, results: DemoResults) -> str:
    """report.md's text."""
    cache = results.cache
    rows = "\n".join(
        f"| {name} | {m.kl:.4f} | {m.top1:.3f} | {m.ce:.3f} | "
        + ("n/a" if m.accuracy is None else f"{m.accuracy:.2f}")
        + " | "
        + ("n/a" if m.agreement is None else f"{m.agreement:.2f}")
        + " |"
        for name, m in results.scores.items()
    )
    rate = (
        f"{cache.teacher_tokens / cache.seconds:,.0f}"
        if cache.teacher_tokens
        else "n/a: every answer came from the cache"
    )
    steps = results.step_seconds
    every = cfg.student_every
    return f"""# distillcache demo report

Teacher `{cfg.teacher}` ({cfg.backend} backend, CPU), {cfg.questions} questions:
{cfg.n_train} for training, {cfg.n_eval} held out. Top-{cfg.k} log-probs, greedy completions
of at most {cfg.max_tokens} tokens. Whole run: {results.total_seconds / 60:.1f} minutes.

## Teacher cache

| figure | value |
| --- | --- |
| teacher tokens (prompt + completion) | {cache.teacher_tokens:,} |
| wall time of both jobs | {cache.seconds:.0f} s |
| teacher tokens/s (end to end, incl. HTTP, shard writes) | {rate} |
| training dataset | {cache.rows} rows, {cache.tokens:,} scored tokens, {cache.bytes:,} bytes |
| bytes per scored token (k={cfg.k}) | {cache.bytes / max(cache.tokens, 1):.1f} |
| second submission of the training job | {cache.again_present} rows already stored, **{cache.again_teacher_tokens} teacher tokens** |

```
{cache.inspect_text.strip()}
```

## Students

Initialised from the teacher, keeping its layers 0, {every}, {2 * every}, ...; trained
{cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr}, on the same shards: **KD** with
forward KL on the top-{cfg.k} plus a tail bucket (T=1), **SFT** with cross-entropy on the
teacher's completions only. Time per step: KD {steps["kd"]:.2f} s,
SFT {steps["sft"]:.2f} s.

| model | held-out KL to teacher (nats/token) | top-1 agreement | CE on teacher tokens | answer accuracy* | same final answer as teacher |
| --- | --- | --- | --- | --- | --- |
{rows}

\\* on the {results.teacher_right} of {cfg.n_eval} held-out questions the teacher answers
correctly (greedy, at most {cfg.max_tokens} tokens); n/a when there are none. The last
column compares final numbers with the teacher's own answer on every held-out question.

![training curves](curves.png)

## What a GPU run would change

On a GPU the same command runs the vLLM backend (`--backend vllm` in `distill serve`),
which batches generation far better than the transformers reference used here, so the
cache step takes seconds; the student steps take milliseconds, so the sizes could grow to
the full GSM8K training set, whole-layer students and thousands of steps.
"""
