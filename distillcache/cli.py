"""The `distill` command: one entry point; each command's logic lives with its part."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distillcache.services.teacher.cli import cache, serve
from distillcache.shared.cli import export, inspect, verify
from distillcache.trainer.cli import train

app = typer.Typer(
    name="distill",
    help=(
        "Run the teacher once, distil many times.\n\n"
        "A teacher service caches completions and top-k log-probs in zstd Parquet shards "
        "(serve, cache); a trainer fits a student from those shards (train); inspect and "
        "verify look at a dataset."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    # Markdown joins the lines of a docstring paragraph, as a reader expects.
    rich_markup_mode="markdown",
)

app.command(rich_help_panel="Datasets")(inspect)
app.command(rich_help_panel="Datasets")(verify)
app.command(rich_help_panel="Datasets")(export)
app.command(rich_help_panel="Training")(train)
app.command(rich_help_panel="Teacher")(serve)
app.command(rich_help_panel="Teacher")(cache)


@app.command(rich_help_panel="Main job")
def demo(
    out_dir: Annotated[Path, typer.Option(help="Where the store, runs and report go.")] = Path(
        "demo-out"
    ),
    cache_dir: Annotated[
        Path, typer.Option(help="Downloaded and converted models and questions.")
    ] = Path(".cache"),
    steps: Annotated[int, typer.Option(help="Training steps of each student.")] = 40,
) -> None:
    """The whole pipeline on a real teacher: cache, train KD and SFT students, report.

    SmolLM2-135M-Instruct answers GSM8K questions through `distill serve`; two students
    (every 5th teacher layer) train from the shards; report.md compares them. About 15
    minutes on 2 CPU cores. A second run is served from the cache.
    """
    from distillcache.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out_dir=out_dir, cache_dir=cache_dir, steps=steps))
