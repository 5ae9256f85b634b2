"""The `distill` command: one entry point; each command's logic lives with its part.

``main`` is what the `distill` script runs. Expected errors (a bad path, a dataset made
differently, a tokenizer mismatch, a malformed file: ``ValueError`` and ``OSError`` and
their kin) print one line, ``error: ...``, and exit 1; usage errors exit 2; Ctrl-C says
how to resume and exits 130. ``--debug`` (or ``DISTILL_DEBUG=1``) shows the traceback
instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from distillcache import __version__
from distillcache.services.teacher.cli import cache, serve
from distillcache.shared.cli import export, inspect, verify
from distillcache.shared.manifest import DatasetError
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
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
    # Markdown joins the lines of a docstring paragraph, as a reader expects.
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"distill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks (or set DISTILL_DEBUG=1).")
    ] = False,
) -> None:
    # The options are handled by their callbacks (--version) and by main (--debug).
    del version, debug


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
    backend: Annotated[
        str | None,
        typer.Option(help="Teacher backend: vllm or transformers (default: vllm where installed)."),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Runs per kind of student, e.g. kd=2,sft=2,xt-sft=1 (kinds: kd, sft, gkd, "
            "xt-kd, xt-sft; default kd=1,sft=1,gkd=1,xt-kd=1,xt-sft=0). A run is about 1.3 "
            "minutes on 2 quiet cores, a GKD run about 1.4."
        ),
    ] = None,
) -> None:
    """The whole pipeline on a real teacher: cache, train five kinds of student, report.

    SmolLM2-135M-Instruct answers GSM8K questions through `distill serve`; students
    (every 5th teacher layer) train from the shards: KD, SFT, GKD (on-policy after a
    warm-up on the shards, scored by a live teacher) and KD on GPT-2's tokenizer
    (cross-tokenizer); report.md compares them and says which margins are beyond the seed
    noise. About 8 minutes on 2 quiet CPU cores. A second run is served from the cache.
    """
    from distillcache.demo import DemoConfig, run_demo

    options: dict = {"backend": backend} if backend is not None else {}
    if seeds is not None:
        defaults = DemoConfig.model_fields["seeds"].default_factory()
        options["seeds"] = {**defaults, **parse_seeds(seeds)}
    run_demo(DemoConfig(out_dir=out_dir, cache_dir=cache_dir, steps=steps, **options))


def parse_seeds(text: str) -> dict[str, int]:
    """``kd=2,sft=2`` as a dict; DemoConfig checks the kinds' names."""
    pairs = [item.split("=") for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 or not pair[1].strip().isdigit() for pair in pairs):
        raise ValueError(f"--seeds {text!r}: write kind=count pairs, e.g. kd=2,sft=2")
    return {kind.strip(): int(count) for kind, count in pairs}


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in (str(error) or type(error).__name__).splitlines()]
    return "; ".join(line for line in lines if line)


def _resume_hint(args: list[str]) -> str:
    if args[:1] == ["train"]:
        return "interrupted; rerun with --resume auto to go on from the last checkpoint"
    return "interrupted; what was stored is kept: run the same command to resume"


def main(argv: list[str] | None = None) -> None:
    """The `distill` script: run the command, turning expected errors into one line.

    typer (standalone) prints usage errors itself (exit 2) and turns Ctrl-C into exit 130;
    every other exception reaches this function.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("DISTILL_DEBUG", "") not in ("", "0")
    try:
        app(args, prog_name="distill")
    except SystemExit as e:
        if e.code == 130:
            typer.echo(_resume_hint(args), err=True)
        raise
    except (ValueError, OSError, LookupError, DatasetError) as e:
        if debug:
            raise
        typer.echo(f"error: {_one_line(e)} (--debug shows the traceback)", err=True)
        sys.exit(1)
