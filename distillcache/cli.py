"""The `distill` command: one entry point; each command's logic lives with its part."""

from __future__ import annotations

import typer

from distillcache.services.teacher.cli import cache, serve
from distillcache.shared.cli import inspect, verify
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
)

app.command(rich_help_panel="Datasets")(inspect)
app.command(rich_help_panel="Datasets")(verify)
app.command(rich_help_panel="Training")(train)
app.command(rich_help_panel="Teacher")(serve)
app.command(rich_help_panel="Teacher")(cache)
