"""`distill serve` and `distill cache`: flags -> TeacherSettings -> the service's code.

Both commands load the backend named by the settings and run the same code: `serve`
puts the FastAPI app in front of it; `cache` runs one batch job in-process through the
very ``run_job`` the service's ``POST /v1/jobs`` runs, with a progress bar instead of
HTTP. Heavy imports (torch, FastAPI) happen inside the commands so `distill --help`
stays quick.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import ValidationError

from .backend import Sampling, TeacherBackend
from .settings import TeacherSettings

BackendName = Literal["transformers", "vllm"]
Codec = Literal["cbrt-u8", "float16", "float32"]

_ENV = "Default: the DISTILL_* variable of the same name, else the built-in default."


async def open_backend(settings: TeacherSettings) -> TeacherBackend:
    """Load the teacher the settings name; settings left unset take the backend's default.

    transformers loads in a worker thread so the server's event loop keeps answering
    probes; vLLM's engine is built on the loop it will serve from.
    """
    options = {
        name: value
        for name, value in (("dtype", settings.dtype), ("max_model_len", settings.max_model_len))
        if value is not None
    }
    if settings.backend == "transformers":
        from .backend_transformers import TransformersBackend

        if settings.device is not None:
            options["device"] = settings.device
        return await asyncio.to_thread(
            TransformersBackend, settings.model, max_k=settings.max_k, **options
        )
    from .backend_vllm import VllmBackend

    if settings.gpu_memory_utilization is not None:
        options["gpu_memory_utilization"] = settings.gpu_memory_utilization
    return VllmBackend(
        settings.model, max_k=settings.max_k, enforce_eager=settings.enforce_eager, **options
    )


def _settings(**given: Any) -> TeacherSettings:
    """Settings from the flags that were given, the environment and the defaults.

    A bad or missing value is a usage error naming both the flag and the variable.
    """
    try:
        return TeacherSettings(
            **{name: value for name, value in given.items() if value is not None}
        )
    except ValidationError as e:
        problems = "; ".join(
            f"--{'-'.join(map(str, err['loc'])).replace('_', '-')} "
            f"(DISTILL_{'_'.join(map(str, err['loc'])).upper()}): {err['msg']}"
            if err["loc"]
            else err["msg"]
            for err in e.errors()
        )
        raise typer.BadParameter(problems) from None


def serve(
    backend: Annotated[BackendName | None, typer.Option(help=f"Teacher backend. {_ENV}")] = None,
    model: Annotated[
        str | None, typer.Option(help="Hub id or local directory of the teacher model.")
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(help="Datasets, inputs and service state; request paths stay inside it."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    max_k: Annotated[int | None, typer.Option(help="Largest top-k a request may ask for.")] = None,
    default_k: Annotated[int | None, typer.Option(help="Top-k when a request names none.")] = None,
    auth_token: Annotated[
        str | None,
        typer.Option(
            help="Bearer token /v1 requires (prefer DISTILL_AUTH_TOKEN: flags show in ps)."
        ),
    ] = None,
    queue_size: Annotated[
        int | None, typer.Option(help="Requests waiting for the teacher before 429.")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Sequences per backend call.")] = None,
    max_inflight_batches: Annotated[
        int | None, typer.Option(help="Backend calls at once (vLLM gains from a few).")
    ] = None,
    logprob_codec: Annotated[Codec | None, typer.Option(help="How log-probs are stored.")] = None,
    device: Annotated[str | None, typer.Option(help="transformers: torch device.")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Weights' dtype (default: the backend's).")
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None, typer.Option(help="vLLM: share of accelerator memory.")
    ] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context length cap.")] = None,
    enforce_eager: Annotated[
        bool | None, typer.Option(help="vLLM: skip graph compilation (quick start).")
    ] = None,
    flush_rows: Annotated[
        int | None, typer.Option(help="Publish stored answers as a shard at this many rows.")
    ] = None,
    flush_seconds: Annotated[
        float | None, typer.Option(help="... or when the oldest is this many seconds old.")
    ] = None,
) -> None:
    """Run the teacher service: generate, score, batch jobs and datasets over HTTP.

    Every option can also be set with its DISTILL_* environment variable (DISTILL_MODEL,
    DISTILL_DATA_ROOT, DISTILL_PORT, ...); options win. OpenAPI docs at /docs.
    """
    import uvicorn

    from .api import create_app

    settings = _settings(
        backend=backend,
        model=model,
        data_root=data_root,
        host=host,
        port=port,
        max_k=max_k,
        default_k=default_k,
        auth_token=auth_token,
        queue_size=queue_size,
        max_batch_size=max_batch_size,
        max_inflight_batches=max_inflight_batches,
        logprob_codec=logprob_codec,
        device=device,
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
        flush_rows=flush_rows,
        flush_seconds=flush_seconds,
    )
    app = create_app(settings, lambda: open_backend(settings))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


def cache(
    input: Annotated[
        Path,
        typer.Argument(
            metavar="INPUT",
            exists=True,
            dir_okay=False,
            help="Input rows: .jsonl, .jsonl.zst or .parquet.",
        ),
    ],
    teacher: Annotated[str, typer.Option(help="Hub id or local directory of the teacher.")],
    out: Annotated[
        Path,
        typer.Option(
            help="Dataset directory; its parent is the data root, whose other "
            "datasets serve as cache."
        ),
    ],
    backend: Annotated[BackendName | None, typer.Option(help=f"Teacher backend. {_ENV}")] = None,
    k: Annotated[int | None, typer.Option(help="Top-k log-probs stored per position.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest generated completion.")] = (
        Sampling.max_tokens
    ),
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = (
        Sampling.temperature
    ),
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = Sampling.top_p,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Sequences per backend call.")] = None,
    logprob_codec: Annotated[Codec | None, typer.Option(help="How log-probs are stored.")] = None,
    device: Annotated[str | None, typer.Option(help="transformers: torch device.")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Weights' dtype (default: the backend's).")
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None, typer.Option(help="vLLM: share of accelerator memory.")
    ] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context length cap.")] = None,
    enforce_eager: Annotated[
        bool | None, typer.Option(help="vLLM: skip graph compilation (quick start).")
    ] = None,
    flush_rows: Annotated[
        int | None, typer.Option(help="Publish a shard every this many new rows.")
    ] = None,
) -> None:
    """Run the teacher over every row of INPUT into the dataset OUT, without HTTP.

    Rows already in OUT are skipped, so rerunning after a crash or Ctrl-C finishes the
    job; rows any other dataset under OUT's parent holds are copied without running the
    teacher. Malformed rows are reported by line number and the rest is cached.
    """
    from rich.console import Console

    from .store import check_dataset_name

    # soft_wrap: row errors and the summary stay one line each, for logs and grep.
    console = Console(stderr=True, soft_wrap=True)
    out = out.resolve()
    try:
        check_dataset_name(out.name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--out") from None
    settings = _settings(
        backend=backend,
        model=teacher,
        data_root=out.parent,
        max_k=k,
        default_k=k,
        max_batch_size=max_batch_size,
        logprob_codec=logprob_codec,
        device=device,
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
        flush_rows=flush_rows,
    )
    sampling = Sampling(max_tokens, temperature, top_p, seed)
    job = asyncio.run(_cache(settings, input.resolve(), out.name, sampling, console))
    p = job.progress
    for error in job.errors:
        console.print(f"[yellow]{input}:{error.line}:[/yellow] {error.message}")
    if p.rows_failed > len(job.errors):
        console.print(f"... and {p.rows_failed - len(job.errors)} more row errors")
    console.print(
        f"{job.state}: {p.rows_done} rows; {p.rows_teacher} by the teacher "
        f"({p.teacher_tokens} tokens), {p.rows_cached} from the cache ({p.cached_tokens} "
        f"tokens), {p.rows_present} already in {out}, {p.rows_failed} failed"
    )
    if job.state != "done":
        console.print(f"[red]error:[/red] {job.message}")
        raise typer.Exit(1)


async def _cache(
    settings: TeacherSettings, input: Path, output: str, sampling: Sampling, console: Any
) -> Any:
    """The job path of the service, in-process: backend, store, engine, run_job."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from distillcache.shared.schema import SamplingInfo

    from .engine import Engine
    from .jobs import JobSpec, JobStore, run_job
    from .metrics import ServiceMetrics
    from .service import TeacherService
    from .store import TeacherIdentity, TeacherStore

    backend = await open_backend(settings)
    store = jobs = None
    try:
        store = await asyncio.to_thread(
            TeacherStore,
            settings.data_root,
            TeacherIdentity.of(backend),
            codec=settings.logprob_codec,
            flush_rows=settings.flush_rows,
            flush_seconds=settings.flush_seconds,
        )
        metrics = ServiceMetrics()
        engine = Engine(
            backend,
            metrics,
            queue_size=settings.queue_size,
            max_batch_size=settings.max_batch_size,
            batch_wait_s=0.0,
            max_inflight=settings.max_inflight_batches,
        )
        service = TeacherService(backend, store, engine, metrics, max_k=settings.max_k)
        if settings.default_k > service.max_k:
            raise typer.BadParameter(
                f"{settings.default_k} is above the teacher engine's maximum {service.max_k}",
                param_hint="--k",
            )
        spec = JobSpec(input=str(input), output=output, k=settings.default_k, **sampling.as_dict())
        await asyncio.to_thread(
            store.open_dataset, output, spec.k, SamplingInfo(**sampling.as_dict())
        )
        jobs = JobStore(store.state_dir / "jobs.sqlite")
        # Rerunning the same command takes over its unfinished job, so its id stays.
        job = next((j for j in jobs.unfinished("cli") if j.spec == spec), None)
        job = job or jobs.create(spec, "cli")
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[counts]}"),
            console=console,
        ) as bar:
            task = bar.add_task(f"caching {input.name}", total=None, counts="")

            def show(job: Any) -> None:
                p = job.progress
                bar.update(
                    task,
                    total=p.rows_total,
                    completed=p.rows_done,
                    counts=f"teacher {p.rows_teacher}  cache {p.rows_cached}  "
                    f"present {p.rows_present}  errors {p.rows_failed}",
                )

            return await run_job(
                service, jobs, job.id, chunk_rows=settings.job_chunk_rows, on_progress=show
            )
    finally:
        if store is not None:
            await asyncio.to_thread(store.close)
        if jobs is not None:
            jobs.close()
        await backend.close()
