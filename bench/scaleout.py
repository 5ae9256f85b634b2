"""Scale-out capture: rows/s with 1 and 2 Ray workers, and the bytes moved per token.

One local Ray cluster (``--cpus`` logical CPUs) is started for the run. The same input
(``--rows`` seed-format rows: a question scored with its teacher solution) is captured
twice by `distill cache --ray`'s ``run_capture``, into fresh datasets: with 1 worker (the
baseline) and with 2, each worker holding the transformers teacher on one torch thread.
Times are end to end (workers started, model loaded, every row published), and again
after startup (from the moment every worker had loaded its teacher), which is the rate a
long capture approaches; ``--rows`` sets how much work amortizes the startup.

Bytes moved per scored token, the figures docs/scale-out.md scales to a 70B teacher:

- planner -> workers: the pickled chunks (queries and row metadata) the planner sends,
  measured by pickling the same chunks the planner makes;
- workers -> storage: the published shard bytes (from the manifest);
- workers -> planner: the per-chunk counts (a few hundred bytes per chunk).

And the planner's own rate (rows rendered, checked and keyed per second on one core),
which bounds how many workers one planner can feed.

The teacher is a small Qwen2 built locally (no hub here); ``--model PATH`` takes any
local checkpoint. The load average is printed before and after: on a shared machine,
other processes' load moves these numbers more than the workers do.

    python bench/scaleout.py                  # 400 rows, 1 vs 2 workers
    python bench/scaleout.py --rows 1000 --cpus 2
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
import time
from itertools import islice
from pathlib import Path

import ray

from distillcache.services.teacher.backend_transformers import TransformersBackend
from distillcache.services.teacher.identity import TeacherIdentity
from distillcache.services.teacher.job_runner import prepare_rows
from distillcache.services.teacher.jobs import JobSpec
from distillcache.services.teacher.scaleout import ChunkCounts, run_capture
from distillcache.services.teacher.settings import ScaleOut, TeacherSettings
from distillcache.shared.inputs import iter_input_rows
from distillcache.shared.manifest import read_manifest
from distillcache.shared.tiny_models import build_tiny_model, synthetic_task_rows, train_tokenizer

K = 20


def build_teacher(root: Path) -> Path:
    """A 4-layer, 256-wide Qwen2 over a 1,000-token BPE vocabulary trained on the rows."""
    corpus = [f"{r['question']} {r['teacher_solution']}" for r in synthetic_task_rows(2000)]
    train_tokenizer(corpus, vocab_size=1000, out_dir=root / "tokenizer")
    return build_tiny_model(
        root / "teacher",
        root / "tokenizer",
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        intermediate_size=512,
        seed=0,
    )


def planner_cost(model: Path, spec: JobSpec, chunk_rows: int) -> tuple[int, float]:
    """What the planner does per row, on its own: render, check and key every row of
    ``spec.input`` as ``run_capture`` does, and pickle the chunks it would send. Returns
    the chunks' bytes and the seconds taken (pickling excluded)."""
    backend = TransformersBackend(model, max_k=K)
    identity = TeacherIdentity.of(backend)
    rows = iter_input_rows(spec.input)
    total, seconds = 0, 0.0
    while chunk := list(islice(rows, chunk_rows)):
        start = time.perf_counter()
        queries, kept, _ = prepare_rows(backend.tokenizer, backend.limits, spec, chunk)
        for query in queries:
            identity.key(query)
        seconds += time.perf_counter() - start
        total += len(pickle.dumps((queries, [r.meta for r in kept])))
    return total, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local cluster")
    parser.add_argument("--model", type=Path, help="a local checkpoint (default: built here)")
    parser.add_argument("--chunk-rows", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        root = Path(tmp)
        model = args.model or build_teacher(root)
        input = root / "rows.jsonl"
        input.write_text("".join(json.dumps(r) + "\n" for r in synthetic_task_rows(args.rows)))
        print(f"load average before: {os.getloadavg()}")
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            results = {}
            for workers in (1, 2):
                out = root / f"data-{workers}" / "ds"
                spec = JobSpec(input=str(input), output=out.name, k=K)
                settings = TeacherSettings(
                    model=str(model), data_root=out.parent, job_chunk_rows=args.chunk_rows
                )
                start = time.perf_counter()
                result = run_capture(settings, spec, ScaleOut(ray=True, workers=workers))
                seconds = time.perf_counter() - start
                # Repeated rows of the input count as present; the rate counts teacher rows.
                assert result.progress.rows_done == args.rows, result.progress
                results[workers] = (
                    seconds,
                    result.startup_seconds,
                    result.progress.rows_teacher,
                    read_manifest(out),
                )
        finally:
            ray.shutdown()
        print(f"load average after: {os.getloadavg()}")

        def rates(seconds: float, startup: float, rows: int) -> tuple[float, float]:
            return rows / seconds, rows / (seconds - startup)

        base = rates(*results[1][:3])
        print(f"\n{args.rows} input rows, k={K}, {args.cpus} logical CPUs, transformers on CPU")
        print(
            "| workers | teacher rows | seconds (startup) | rows/s end to end | vs 1 worker "
            "| rows/s after startup | vs 1 worker |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for workers, (seconds, startup, rows, _) in results.items():
            whole, steady = rates(seconds, startup, rows)
            print(
                f"| {workers} | {rows} | {seconds:.1f} ({startup:.1f}) | {whole:.1f} "
                f"| {whole / base[0]:.2f}x | {steady:.1f} | {steady / base[1]:.2f}x |"
            )

        manifest = results[2][3]
        tokens = manifest.tokens
        spec = JobSpec(input=str(input), output="ds", k=K)
        sent, planning = planner_cost(model, spec, args.chunk_rows)
        chunks = -(-args.rows // args.chunk_rows)
        counts = chunks * len(pickle.dumps(ChunkCounts(1, 1, 1, 1)))
        print(f"\nbytes moved per scored token ({tokens} tokens, {len(manifest.shards)} shards):")
        print(f"  planner -> workers (chunks): {sent / tokens:.1f}")
        print(f"  workers -> storage (shards): {manifest.bytes / tokens:.1f}")
        print(f"  workers -> planner (counts): {counts / tokens:.2f}")
        print(f"  total: {(sent + manifest.bytes + counts) / tokens:.1f}")
        print(f"\nplanner, one core: {args.rows / planning:.0f} rows/s rendered, checked and keyed")


if __name__ == "__main__":
    main()
