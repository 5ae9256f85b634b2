"""`distill inspect`, `verify` and `export`: look at a dataset, check it, copy it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from .codec import codec_kl_estimate
from .export import export_dataset
from .manifest import DatasetError
from .reader import ShardDataset, verify_dataset
from .schema import LogprobCodec

_BINS = np.linspace(0.0, 1.0, 11)


def dataset_histograms(ds: ShardDataset) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Counts of the teacher's top-1 probability and of the tail mass, in ten bins of
    [0, 1]; the mean entries kept per position; the codec's estimated KL per position.

    Streams the decoded row groups one at a time, so it runs on datasets larger than
    memory. The KL is ``codec_kl_estimate`` for the codec that bounds the values'
    exactness (``DatasetInfo.exact_as``): a shard keeps no exact values to measure against.
    A sampled dataset's positions are its draws' empirical distribution (top-1: the share
    of the most drawn id; no tail); its KL is NaN: draws have no codec to estimate.
    """
    top1 = np.zeros(len(_BINS) - 1, dtype=np.int64)
    tail = np.zeros(len(_BINS) - 1, dtype=np.int64)
    kept, kl, positions = 0.0, 0.0, 0
    for batch in ds.iter_decoded():
        lp = batch.topk_logprobs
        p1 = np.exp(lp.max(axis=1))
        pt = np.exp(batch.tail_logprob.astype(np.float64))
        top1 += np.histogram(np.clip(p1, 0, 1), _BINS)[0]
        tail += np.histogram(np.clip(pt, 0, 1), _BINS)[0]
        kept += float(np.isfinite(lp).sum())
        if ds.info.sampled is None:
            kl += float(codec_kl_estimate(lp, ds.info.exact_as).sum())
        positions += len(lp)
    n = max(positions, 1)
    return top1, tail, kept / n, kl / n if ds.info.sampled is None else float("nan")


def _bars(counts: np.ndarray, title: str) -> Table:
    table = Table(title=title, show_edge=False)
    table.add_column("range")
    table.add_column("positions", justify="right")
    table.add_column("", min_width=30)
    peak = max(int(counts.max()), 1)
    for lo, hi, n in zip(_BINS[:-1], _BINS[1:], counts, strict=True):
        table.add_row(f"{lo:.1f}-{hi:.1f}", f"{int(n):,}", "█" * round(30 * int(n) / peak))
    return table


def inspect(
    dataset: Annotated[
        str,
        typer.Argument(
            help="Dataset directory (holds .manifest.json and the shards) or s3://BUCKET/PREFIX."
        ),
    ],
    student: Annotated[
        str | None,
        typer.Option(
            help="Also report how the completions align with this student's tokenizer (a "
            "model or tokenizer directory): chunk coverage, 1:1 chunks, matched-mass "
            "coverage, for --cross-tokenizer training."
        ),
    ] = None,
    teacher_tokenizer: Annotated[
        str | None,
        typer.Option(
            help="With --student: the teacher's tokenizer, if not where the dataset says."
        ),
    ] = None,
    max_rows: Annotated[
        int | None, typer.Option(help="With --student: align at most this many rows.")
    ] = None,
) -> None:
    """Summarize a dataset: size, bytes per token, k, teacher, tokenizer, histograms.

    The histograms show the teacher's top-1 probability and the mass outside the top-k
    per scored position: a large tail says k is too small for this teacher.
    """
    console = Console(soft_wrap=True)
    try:
        ds = ShardDataset(dataset)
        top1, tail, mean_kept, codec_kl = dataset_histograms(ds)
    except DatasetError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    m, info = ds.manifest, ds.info
    if info.sampled is None:
        mode = [
            ("bytes / top-k entry", f"{m.bytes / max(m.tokens * mean_kept, 1):.2f}"),
            ("k", str(info.k) if info.adaptive is None else f"at most {info.k}, {info.adaptive}"),
            ("entries / position", f"{mean_kept:.2f}"),
            (
                "log-prob codec",
                info.logprob_codec
                + (f" (values as exact as {info.precision})" if info.precision else ""),
            ),
            ("codec KL to exact (est.)", f"{codec_kl:.1e} nats / position"),
        ]
    else:
        mode = [
            ("bytes / distinct id", f"{m.bytes / max(m.tokens * mean_kept, 1):.2f}"),
            (
                "sampled (RS-KD)",
                f"{info.sampled.draws} draws / position at temperature"
                f" {info.sampled.temperature:g}, seeded by the {info.sampled.seed_rule}",
            ),
            ("distinct ids / position", f"{mean_kept:.2f}"),
            ("stored", "distinct ids and one-byte counts; no log-probs, no tail"),
            (
                "KL to exact",
                "not reported: a sampled dataset keeps draws, not the teacher's log-probs;"
                " its counts / N estimate the distribution without bias, with sampling noise",
            ),
        ]
    summary = Table(title=str(dataset), show_header=False, show_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    rows = [
        ("shards", f"{len(m.shards)}"),
        ("rows", f"{m.rows:,}"),
        ("scored tokens", f"{m.tokens:,}"),
        ("bytes", f"{m.bytes:,}"),
        ("bytes / token", f"{m.bytes / max(m.tokens, 1):.1f}"),
        *mode,
        ("teacher", f"{info.teacher_model} @ {info.teacher_revision}"),
        ("tokenizer", f"{info.tokenizer} (sha256 {info.tokenizer_hash[:12]})"),
        ("vocab / logit width", f"{info.vocab_size:,} / {info.logit_width:,}"),
        ("backend", f"{info.backend} {info.backend_version}"),
        (
            "sampling",
            "per request (each row's request column)"
            if info.sampling is None
            else ", ".join(f"{k}={v}" for k, v in info.sampling.model_dump().items()),
        ),
        (
            "updated",
            datetime.fromtimestamp(m.updated, tz=UTC).isoformat(timespec="seconds"),
        ),
    ]
    for name, value in rows:
        summary.add_row(name, value)
    console.print(summary)
    if info.sampled is None:
        console.print(_bars(top1, "teacher top-1 probability"))
        console.print(_bars(tail, "probability mass outside the top-k"))
    else:
        console.print(_bars(top1, "share of the draws taken by the most drawn id"))
    if student is not None:
        _print_alignment(console, dataset, student, teacher_tokenizer, max_rows)


def _print_alignment(
    console: Console, dataset: str, student: str, teacher: str | None, max_rows: int | None
) -> None:
    # Imported here: the trainer needs torch and transformers, plain inspect does not.
    from distillcache.trainer.alignment_report import report_dataset

    try:
        report = report_dataset(dataset, student, teacher_tokenizer=teacher, max_rows=max_rows)
    except (OSError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    table = Table(title=f"alignment with {student}", show_header=False, show_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in report.shares().items():
        table.add_row(name, f"{value:,}" if isinstance(value, int) else f"{value:.4f}")
    console.print(table)


def verify(
    dataset: Annotated[
        str,
        typer.Argument(
            help="Dataset directory (holds .manifest.json and the shards) or s3://BUCKET/PREFIX."
        ),
    ],
) -> None:
    """Check every shard's sha256, size, schema and row count against the manifest.

    Exits non-zero on any fault and names the shard. Files the manifest does not list
    (left by an interrupted writer) are reported but are not faults: readers never see them.
    """
    # soft_wrap keeps each path on one line, so it can be copied and grepped.
    console = Console(soft_wrap=True)
    faults, notes = verify_dataset(dataset)
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    for fault in faults:
        console.print(f"[red]fault:[/red] {fault}")
    if faults:
        raise typer.Exit(1)
    ds = ShardDataset(dataset)
    console.print(
        f"[green]ok:[/green] {len(ds.manifest.shards)} shards, {ds.manifest.rows:,} rows verified"
    )


def export(
    dataset: Annotated[str, typer.Argument(help="Dataset directory (or s3:// URI) to copy.")],
    out: Annotated[str, typer.Argument(help="New dataset directory (or s3:// URI) to create.")],
    codec: Annotated[
        LogprobCodec, typer.Option(help="Log-prob codec of the copy; float32 gives plain floats.")
    ] = "float32",
) -> None:
    """Copy a dataset with another log-prob codec, in the current shard layout.

    `--codec float32` (the default) gives plain float log-probs in every Parquet reader.
    Going to a more exact codec cannot restore what the source codec rounded away: the
    copy's metadata says so (`precision`). Also brings older datasets to the current
    schema version.
    """
    console = Console(soft_wrap=True)
    try:
        manifest = export_dataset(dataset, out, codec)
    except DatasetError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    info = manifest.info
    exact = f"; values as exact as {info.precision}" if info.precision else ""
    console.print(
        f"[green]ok:[/green] {manifest.rows:,} rows, {manifest.tokens:,} scored tokens,"
        f" {manifest.bytes:,} bytes in {out} (codec {info.logprob_codec}{exact})"
    )
