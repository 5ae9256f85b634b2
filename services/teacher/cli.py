"""`distill serve` and `distill cache`: flags -> TeacherSettings -> the runtime.

Both commands load the backend named by the settings and build the same runtime
(runtime.py): `serve` puts the FastAPI app in front of it; `cache` runs one batch job
in-process through the very ``execute_job`` the service's ``POST /v1/jobs`` runs, with a
progress bar instead of HTTP. The flags are generated from ``TeacherSettings`` (every
field for `serve`, the ``CACHE_SETTINGS`` subset for `cache`) and from ``Sampling``, so
their names, help and checks are the settings' own. Heavy imports (torch, FastAPI) happen
inside the commands so `distill --help` stays quick.
"""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ValidationError

from distillcache.flags import flag, given, options
from distillcache.shared.schema import Sampling

from .settings import ScaleOut, TeacherSettings

ENV_PREFIX = "DISTILL_"
# The settings `distill cache` takes as flags; the rest (host, port, queue...) are the
# server's. `model`, `data_root`, `max_k` and `default_k` come from --teacher, --out, --k.
CACHE_SETTINGS = (
    "backend",
    "max_batch_size",
    "logprob_codec",
    "adaptive_mass",
    "adaptive_min_prob",
    "adaptive_min_k",
    "sampled_draws",
    "sample_temperature",
    "device",
    "dtype",
    "gpu_memory_utilization",
    "max_model_len",
    "enforce_eager",
    "flush_rows",
    "job_chunk_rows",
)


def _valid(model: type[BaseModel], values: dict[str, Any]) -> Any:
    """``model`` from the given values, the environment and the defaults; a bad or
    missing value is a usage error naming the flag (and its variable, for settings)."""
    try:
        return model(**values)
    except ValidationError as e:
        problems = "; ".join(
            f"{flag(str(err['loc'][0]))}"
            + (f" ({ENV_PREFIX}{str(err['loc'][0]).upper()})" if model is TeacherSettings else "")
            + f": {err['msg']}"
            if err["loc"]
            else err["msg"]
            for err in e.errors()
        )
        raise typer.BadParameter(problems) from None


def serve(**flags: Any) -> None:
    import uvicorn

    from distillcache import preflight

    from .app import create_app
    from .runtime import open_backend
    from .server import server_config

    settings = _valid(TeacherSettings, given(flags))
    preflight.model_ref(settings.model, "--model")
    preflight.writable(settings.data_root, "--data-root")
    failures: list[str] = []

    def stop(error: str) -> None:
        failures.append(error)
        server.should_exit = True

    app = create_app(settings, lambda: open_backend(settings), on_load_failure=stop)
    server = uvicorn.Server(server_config(app, settings))
    server.run()
    if failures:
        raise ValueError(f"the teacher {settings.model} failed to load: {failures[0]}")


serve.__doc__ = f"""Run the teacher service: generate, score, batch jobs and datasets over HTTP.

Every option can also be set with its {ENV_PREFIX}* environment variable ({ENV_PREFIX}MODEL,
{ENV_PREFIX}DATA_ROOT, {ENV_PREFIX}PORT, ...); options win. OpenAPI docs at /docs.
"""
serve.__signature__ = inspect.Signature(options(TeacherSettings, env_prefix=ENV_PREFIX))


def cache(
    input: Path,
    teacher: str,
    out: str,
    k: int | None = None,
    max_failures: int = 0,
    **flags: Any,
) -> None:
    from rich.console import Console

    from distillcache import preflight

    from .store import check_dataset_name

    # soft_wrap: row errors and the summary stay one line each, for logs and grep.
    console = Console(stderr=True, soft_wrap=True)
    from distillcache.shared.storage import is_uri

    chosen = given(flags)
    scale = _valid(ScaleOut, {n: v for n, v in chosen.items() if n in ScaleOut.model_fields})
    remote = is_uri(out)
    if remote and not scale.ray:
        raise typer.BadParameter(
            f"{out}: a dataset on object storage is written by a --ray capture; add --ray",
            param_hint="--out",
        )
    # A remote dataset's workers keep their runtime state in scratch directories; the
    # data root is then this machine's working directory, which nothing writes to.
    out = out if remote else Path(out).resolve()
    name = out.rstrip("/").rsplit("/", 1)[-1] if remote else out.name
    try:
        check_dataset_name(name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--out") from None
    sampling = _valid(Sampling, {n: v for n, v in chosen.items() if n in Sampling.model_fields})
    settings = _valid(
        TeacherSettings,
        {
            **{n: v for n, v in chosen.items() if n in CACHE_SETTINGS},
            **given({"max_k": k, "default_k": k}),
            "model": teacher,
            "data_root": Path.cwd() if remote else out.parent,
        },
    )
    # Everything that can be checked before the teacher loads.
    preflight.input_file(input)
    preflight.model_ref(teacher, "--teacher")
    vocab = preflight.vocab_size(teacher)
    if vocab is not None and settings.default_k > vocab:
        raise ValueError(f"--k {settings.default_k}: the teacher's vocabulary has {vocab} tokens")
    if scale.ray:
        preflight.ray_address(scale.ray_address, "--ray-address")
    if not remote:
        preflight.writable(out, "--out")
    _check_existing_dataset(out, settings, sampling)
    if not remote:
        console.print(
            f"data root {out.parent} (its other datasets serve as cache; state in "
            f"{out.parent / '.distill'})"
        )
    if scale.ray:
        state, message, p, errors = _cache_on_ray(settings, input, out, sampling, scale, console)
    else:
        job = asyncio.run(_cache(settings, input.resolve(), out.name, sampling, console))
        state, message, p, errors = job.state, job.message, job.progress, job.errors
    for error in errors:
        console.print(f"[yellow]{input}:{error.line}:[/yellow] {error.message}")
    if p.rows_failed > len(errors):
        console.print(f"... and {p.rows_failed - len(errors)} more row errors")
    console.print(
        f"{state}: {p.rows_done} rows; {p.rows_teacher} by the teacher "
        f"({p.teacher_tokens} tokens), {p.rows_cached} from the cache ({p.cached_tokens} "
        f"tokens), {p.rows_present} already in {out}, {p.rows_failed} failed"
    )
    if state != "done":
        console.print(f"[red]error:[/red] {message}")
        raise typer.Exit(1)
    if p.rows_failed > max_failures:
        console.print(
            f"[red]error:[/red] {p.rows_failed} rows failed (--max-failures {max_failures})"
        )
        raise typer.Exit(1)


def _check_existing_dataset(out: Path | str, settings: TeacherSettings, sampling: Sampling) -> None:
    """One dataset, one set of settings: a rerun with another k, codec, adaptive-k rule,
    sampled mode or sampling would mix rows made differently under metadata that names only the first."""
    from distillcache.shared.manifest import DatasetError, read_manifest

    try:
        info = read_manifest(out).info
    except DatasetError:
        return  # no dataset yet, or one the writer will refuse with its own message
    wanted = {
        "k": settings.default_k,
        "logprob_codec": settings.logprob_codec,
        "adaptive k": settings.adaptive_k,
    }
    stored = {"k": info.k, "logprob_codec": info.logprob_codec, "adaptive k": info.adaptive}
    if settings.sampled is not None or info.sampled is not None:
        # A sampled dataset's k and codec follow from its mode (DatasetInfo).
        wanted = {"sampled": settings.sampled}
        stored = {"sampled": info.sampled}
    if info.sampling is not None:
        wanted.update(sampling.model_dump())
        stored.update(info.sampling.model_dump())
    differs = [f"{n} {stored[n]} (now {wanted[n]})" for n in wanted if wanted[n] != stored[n]]
    if differs:
        raise ValueError(
            f"--out {out}: this dataset was made with {', '.join(differs)}; "
            "use a new --out for other settings"
        )


cache.__doc__ = """Run the teacher over every row of INPUT into the dataset OUT, without HTTP.

Rows already in OUT are skipped, so rerunning after a crash or Ctrl-C finishes the
job; rows any other dataset under OUT's parent holds are copied without running the
teacher. Malformed rows are reported by line number and the rest is cached.
"""
cache.__signature__ = inspect.Signature(
    [
        inspect.Parameter(
            "input",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Annotated[
                Path,
                typer.Argument(
                    metavar="INPUT",
                    exists=True,
                    dir_okay=False,
                    help="Input rows: .jsonl, .jsonl.zst or .parquet.",
                ),
            ],
        ),
        inspect.Parameter(
            "teacher",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[
                str, typer.Option(help="Hub id or local directory of the teacher.")
            ],
        ),
        inspect.Parameter(
            "out",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[
                str,
                typer.Option(
                    help="Dataset directory; its parent is the data root, whose other "
                    "datasets serve as cache. With --ray, also s3://BUCKET/PREFIX/NAME."
                ),
            ],
        ),
        inspect.Parameter(
            "k",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                int | None,
                typer.Option(
                    min=1,
                    help="Top-k log-probs stored per position "
                    f"[default: {TeacherSettings.model_fields['default_k'].default}].",
                ),
            ],
        ),
        inspect.Parameter(
            "max_failures",
            inspect.Parameter.KEYWORD_ONLY,
            default=0,
            annotation=Annotated[
                int,
                typer.Option(
                    min=0,
                    help="Rows that may fail (bad JSON, no prompt, too long) before the "
                    "command exits 1; they are reported by line either way.",
                ),
            ],
        ),
        *options(Sampling),
        *options(TeacherSettings, CACHE_SETTINGS, env_prefix=ENV_PREFIX),
        *options(ScaleOut),
    ]
)


def _cache_on_ray(
    settings: TeacherSettings,
    input: Path,
    out: Path | str,
    sampling: Sampling,
    scale: ScaleOut,
    console: Any,
) -> tuple[str, str | None, Any, list[Any]]:
    """`distill cache --ray`: the capture planned here, answered by Ray workers
    (scaleout.py), with the same progress bar and summary as the in-process job."""
    try:
        import ray  # noqa: F401 - checked before anything starts
    except ImportError:
        raise typer.BadParameter(
            "Ray is not installed: pip install 'distillcache[ray]'", param_hint="--ray"
        ) from None
    from .jobs import JobProgress, JobSpec
    from .scaleout import run_capture

    spec = JobSpec(
        input=str(input.resolve()),
        output=out if isinstance(out, str) else out.name,
        k=settings.default_k,
        **sampling.model_dump(),
    )
    with _progress_bar(console) as show:
        task = show.add_task(
            f"caching {input.name} on {scale.workers} Ray workers", total=None, counts=""
        )
        try:
            result = run_capture(settings, spec, scale, on_progress=lambda p: _show(show, task, p))
        except RuntimeError as e:
            return "failed", str(e), JobProgress(), []
    if result.workers_restarted or result.workers_lost:
        console.print(
            f"{result.workers_restarted} workers restarted, {result.workers_lost} lost; "
            f"{result.rows_recomputed} rows they had not published were computed again"
        )
    return "done", None, result.progress, result.errors


async def _cache(
    settings: TeacherSettings, input: Path, output: str, sampling: Sampling, console: Any
) -> Any:
    """The job path of the service, in-process: the runtime, then ``execute_job``."""
    from .job_runner import execute_job
    from .jobs import JobSpec
    from .metrics import ServiceMetrics
    from .runtime import build_runtime, open_backend

    runtime = await build_runtime(settings, await open_backend(settings), ServiceMetrics())
    try:
        if settings.default_k > runtime.service.max_k:
            raise typer.BadParameter(
                f"{settings.default_k} is above the teacher engine's maximum "
                f"{runtime.service.max_k}",
                param_hint="--k",
            )
        spec = JobSpec(
            input=str(input), output=output, k=settings.default_k, **sampling.model_dump()
        )
        await asyncio.to_thread(runtime.store.open_dataset, output, spec.k, sampling)
        # Rerunning the same command takes over its unfinished job, so its id stays.
        job = next((j for j in runtime.jobs.unfinished("cli") if j.spec == spec), None)
        job = job or runtime.jobs.create(spec, "cli")
        with _progress_bar(console) as bar:
            task = bar.add_task(f"caching {input.name}", total=None, counts="")
            return await execute_job(
                runtime.service,
                runtime.jobs,
                job.id,
                chunk_rows=settings.job_chunk_rows,
                on_progress=lambda job: _show(bar, task, job.progress),
            )
    finally:
        await runtime.close()


def _progress_bar(console: Any) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[counts]}"),
        console=console,
    )


def _show(bar: Any, task: Any, p: Any) -> None:
    bar.update(
        task,
        total=p.rows_total,
        completed=p.rows_done,
        counts=f"teacher {p.rows_teacher}  cache {p.rows_cached}  "
        f"present {p.rows_present}  errors {p.rows_failed}",
    )
