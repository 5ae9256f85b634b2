"""The `distill` command: one entry point; each command's logic lives with its part."""

from __future__ import annotations

import typer

from distillcache.shared.cli import inspect, verify

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
