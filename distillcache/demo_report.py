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
    """One model on the held-out questions: distribution fidelity and final answers.

    ``top1`` and ``ce`` are per token of the teacher's vocabulary, so None for a model on
    another tokenizer; ``kl`` is then the chunk divergence (``trainer/cross_tokenizer.py``);
    ``bpb`` (bits per byte of the teacher's completions) holds for every model."""

    kl: float
    top1: float | None
    ce: float | None
    bpb: float
    accuracy: float | None
    agreement: float | None
    teacher_right: int


@dataclass(frozen=True)
class StudentRows:
    """One kind of student, trained once per seed: its scores, its step time and, for an
    on-policy kind, each run's on-policy totals (``demo.onpolicy_cost``)."""

    kind: str
    seeds: list[ModelScores]
    step_seconds: float
    onpolicy: list[dict[str, float]]

    def values(self, field: str) -> list[float]:
        return [getattr(s, field) for s in self.seeds if getattr(s, field) is not None]

    def scored_tokens(self) -> tuple[float, float]:
        """Mean over seeds of the on-policy tokens the teacher scored fresh, and of those
        answered from the cache."""
        n = max(len(self.onpolicy), 1)
        fresh = sum(c["onpolicy/teacher_tokens"] for c in self.onpolicy) / n
        cached = sum(c["onpolicy/cache_tokens"] for c in self.onpolicy) / n
        return fresh, cached


@dataclass(frozen=True)
class DemoResults:
    cache: CacheFigures
    baselines: dict[str, ModelScores]
    students: dict[str, StudentRows]
    teacher_right: int
    total_seconds: float


LABELS = {
    "kd": "student KD",
    "sft": "student SFT",
    "gkd": "student GKD",
    "xt-kd": "student KD, cross-tokenizer",
    "xt-sft": "student SFT, cross-tokenizer",
}


def plot_curves(runs: dict[str, Path], path: Path) -> None:
    """Training loss and held-out KL against step, one line per kind (its first seed)."""
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
    axes[1].set(
        title="held-out KL to the teacher (nats/token; chunks across tokenizers)", xlabel="step"
    )
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def spread(values: list[float], digits: int) -> str:
    """A figure over seeds: the value for one seed, else the mean and (lowest-highest)."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    mean = sum(values) / len(values)
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def margin(
    first: StudentRows | None, second: StudentRows | None, field: str, what: str, lower: bool
) -> str | None:
    """One sentence: is ``first``'s margin over ``second`` on ``field`` beyond the noise?

    Beyond the noise means every seed of one kind beats every seed of the other, with at
    least two seeds each (one seed shows no spread at all)."""
    if first is None or second is None:
        return None
    a, b = first.values(field), second.values(field)
    if not a or not b:
        return None
    sign = 1 if lower else -1
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    gap = sign * (mean_b - mean_a)
    names = f"{LABELS[first.kind]} against {LABELS[second.kind]}"
    lead = f"{names}, {what}: {'ahead' if gap > 0 else 'behind'} by {abs(gap):.3f} on average"
    if len(a) < 2 or len(b) < 2:
        return f"{lead}; one seed on a side, so no spread is measured: **not shown beyond noise**."
    low_a, high_a, low_b, high_b = min(a), max(a), min(b), max(b)
    apart = high_a < low_b or high_b < low_a
    spreads = (
        f"spreads {high_a - low_a:.3f} and {high_b - low_b:.3f} over {len(a)} and {len(b)} seeds"
    )
    if apart:
        return f"{lead}; every seed on the same side ({spreads}): **beyond the noise**."
    return f"{lead}; the seeds overlap ({spreads}): **within the noise**."


def render_report(cfg: DemoConfig, results: DemoResults) -> str:
    """report.md's text."""
    cache = results.cache
    students = results.students

    def cells(scores: list[ModelScores], seeds: str, tokens: str) -> str:
        def pick(field: str) -> list[float]:
            return [getattr(s, field) for s in scores if getattr(s, field) is not None]

        return (
            f"{seeds} | {spread(pick('kl'), 4)} | {spread(pick('top1'), 3)} | "
            f"{spread(pick('ce'), 3)} | {spread(pick('bpb'), 3)} | "
            f"{spread(pick('accuracy'), 2)} | {spread(pick('agreement'), 2)} | {tokens} |"
        )

    lines = [f"| {name} | " + cells([m], "", "") for name, m in results.baselines.items()]
    paid = []
    for kind, rows in students.items():
        tokens = f"{cache.tokens:,} cached"
        if rows.onpolicy:
            fresh, cached = rows.scored_tokens()
            tokens += f" + {fresh + cached:,.0f} scored on-policy"
            paid.append(
                f"{LABELS[kind]}: {fresh:,.0f} scored fresh this run, {cached:,.0f} "
                "answered from the cache (mean over seeds)"
            )
        lines.append(f"| {LABELS[kind]} | " + cells(rows.seeds, str(len(rows.seeds)), tokens))
    table = "\n".join(lines)
    verdicts = [
        margin(students.get("kd"), students.get("sft"), "kl", "held-out KL", lower=True),
        margin(students.get("kd"), students.get("sft"), "bpb", "bits per byte", lower=True),
        margin(students.get("gkd"), students.get("sft"), "kl", "held-out KL", lower=True),
        margin(students.get("gkd"), students.get("sft"), "bpb", "bits per byte", lower=True),
        margin(students.get("xt-kd"), students.get("xt-sft"), "bpb", "bits per byte", lower=True),
        margin(
            students.get("xt-kd"), students.get("xt-sft"), "agreement", "same answer", lower=False
        ),
    ]
    verdict_text = "\n".join(f"- {v}" for v in verdicts if v)
    rate = (
        f"{cache.teacher_tokens / cache.seconds:,.0f}"
        if cache.teacher_tokens
        else "n/a: every answer came from the cache"
    )
    step_text = ", ".join(
        f"{LABELS[kind]} {rows.step_seconds:.2f} s" for kind, rows in students.items()
    )
    gkd_text = ""
    if "gkd" in students:
        warmup = int(cfg.gkd_warmup * cfg.steps)
        gkd_text = (
            f" **GKD** (on-policy, Agarwal et al. 2024): after {warmup} steps on the shards, "
            f"each step is on the student's own samples with probability {cfg.gkd_fraction} "
            f"(at most {cfg.gkd_max_new_tokens} new tokens, T=1), scored by the teacher "
            f"through `POST /v1/score` with the student's top ids (`score_ids`, a "
            f"transformers-backend `distill serve` started for it: vLLM cannot return "
            f"them), the other steps read the shards; {cfg.gkd_loss} throughout, on the "
            f"union of both top-k sets on its own samples."
        )
    cross_text = ""
    if "xt-kd" in students or "xt-sft" in students:
        cross_text = (
            f" The **cross-tokenizer** students are the same student moved to the real "
            f"{cfg.cross_tokenizer} tokenizer (embeddings from the teacher's rows for the "
            f"same text) and trained with `--cross-tokenizer` from the same shards: KD with "
            f"the span-aligned loss, SFT on the retokenized teacher text."
        )
    every = cfg.student_every
    paid_text = "; ".join(paid) if paid else "no on-policy student"
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
{cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr}, from the same shards: **KD** with
forward KL on the top-{cfg.k} plus a tail bucket (T=1), **SFT** with cross-entropy on the
teacher's completions only.{gkd_text}{cross_text} Time per step: {step_text}.

| model | seeds | held-out KL to teacher (nats/token) | top-1 agreement | CE on teacher tokens | bits per byte of teacher text | answer accuracy* | same final answer as teacher | teacher tokens behind it |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{table}

With several seeds (data order, sampling), a cell is the mean and (lowest-highest). The
cross-tokenizer rows' KL is the chunk divergence of the aligned loss (not the same
outcomes as the others'); top-1 and CE are per teacher token, so n/a there. Bits per byte
of the teacher's held-out completions do not depend on the tokenizer. Teacher tokens
behind a student: the scored tokens of the cached training set it reads (one capture
serves every student), plus, on-policy, the completion tokens the teacher scored for it
({paid_text}).

\\* on the {results.teacher_right} of {cfg.n_eval} held-out questions the teacher answers
correctly (greedy, at most {cfg.max_tokens} tokens); n/a when there are none. The next
column compares final numbers with the teacher's own answer on every held-out question.

Is a margin real? Beyond the noise means every seed of one kind beats every seed of the
other:

{verdict_text}

![training curves](curves.png)

## What a GPU run would change

On a GPU the same command runs the vLLM backend (`--backend vllm` in `distill serve`),
which batches generation far better than the transformers reference used here, so the
cache step takes seconds; the student steps take milliseconds, so the sizes could grow to
the full GSM8K training set, whole-layer students, thousands of steps and enough seeds
to settle every margin above.
"""
