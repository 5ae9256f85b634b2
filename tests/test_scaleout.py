"""`distill cache --ray`: capture over Ray workers on a real local Ray cluster.

The module starts one local cluster (``ray.init`` with 4 logical CPUs, shut down at the
end) and runs real teacher workers (the tiny transformers teacher, one process each).
What must hold, against a single-process `distill cache` run of the same file as the
reference: every row exactly once, the same keys, the same values within one level of
the log-prob codec; a worker SIGKILLed mid-run costs nothing; two captures into one
dataset at once both land; a rerun computes only what is missing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from s3_server import s3_environment
from typer.testing import CliRunner

from distillcache.cli import app, main
from distillcache.services.teacher.jobs import JobProgress, JobSpec
from distillcache.services.teacher.scaleout import CaptureResult, run_capture
from distillcache.services.teacher.settings import ScaleOut, TeacherSettings
from distillcache.shared.manifest import read_manifest
from distillcache.shared.reader import ShardDataset, verify_dataset

ray = pytest.importorskip("ray")

ROWS = 160
MAX_TOKENS = 6
CHUNK = 16
BUCKET = "distill-ray"


def write_rows(path: Path, numbers: range) -> Path:
    """Scoring rows (question + solution) and, every third, a generation row."""
    with open(path, "w") as f:
        for i in numbers:
            if i % 3 == 0:
                row = {"prompt": f"What is {i} + {i % 11}?", "id": i}
            else:
                row = {
                    "question": f"Tom has {i} apples and buys {i % 7} more. How many?",
                    "teacher_solution": f"{i} + {i % 7} = {i + i % 7}. The answer is {i + i % 7}.",
                    "id": i,
                }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server (a real S3-protocol process) with a bucket, and the standard AWS
    variables pointing at it: set before the cluster starts, so every worker has them,
    as every node of a real cluster has its credentials."""
    with s3_environment(BUCKET) as url:
        yield url


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rows(tmp_path_factory.mktemp("input") / "rows.jsonl", range(ROWS))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, teacher_model: Path, rows: Path) -> Path:
    """The same file through the single-process `distill cache`."""
    out = tmp_path_factory.mktemp("single") / "ds"
    with pytest.raises(SystemExit) as done:
        main(
            [
                "cache",
                str(rows),
                "--teacher",
                str(teacher_model),
                "--out",
                str(out),
                "--max-tokens",
                str(MAX_TOKENS),
            ]
        )
    assert done.value.code == 0
    return out


def capture(
    teacher: Path,
    input: Path,
    out: Path | str,
    workers: int,
    on_progress: Callable[[JobProgress], None] | None = None,
    **settings: object,
) -> CaptureResult:
    remote = isinstance(out, str)
    spec = JobSpec(
        input=str(input), output=out if remote else out.name, k=20, max_tokens=MAX_TOKENS
    )
    config = TeacherSettings(
        model=str(teacher),
        data_root=Path.cwd() if remote else out.parent,
        job_chunk_rows=CHUNK,
        **settings,
    )
    return run_capture(config, spec, ScaleOut(ray=True, workers=workers), on_progress=on_progress)


def records(path: Path | str) -> dict:
    return {r.key: r for r in ShardDataset(path).iter_records()}


def assert_each_row_once(path: Path | str, expected: set[str]) -> None:
    tables = ShardDataset(path).iter_tables(columns=["key"])
    counts = Counter(key for table in tables for key in table["key"].to_pylist())
    assert set(counts) == expected
    assert max(counts.values()) == 1
    assert read_manifest(path).rows == len(expected)
    faults, _ = verify_dataset(path)
    assert faults == []


def cbrt_codes(logprobs: np.ndarray) -> np.ndarray:
    """The cbrt-u8 codes the decoded log-probs came from (codec.py: logp = 3 log(c/255))."""
    return np.rint(255 * np.exp(logprobs.astype(np.float64) / 3))


def test_two_workers_store_what_one_process_stores(
    cluster, teacher_model, rows, reference, tmp_path
):
    out = tmp_path / "data" / "ds"
    result = capture(teacher_model, rows, out, workers=2)

    expected = records(reference)
    assert len(expected) == ROWS
    assert_each_row_once(out, set(expected))
    got = records(out)
    for key, want in expected.items():
        row = got[key]
        assert row.prompt_ids.tolist() == want.prompt_ids.tolist()
        assert row.completion_ids.tolist() == want.completion_ids.tolist()
        assert row.meta == want.meta
        np.testing.assert_array_equal(row.topk_ids, want.topk_ids)
        # Equal within the codec's exactness: at most one cbrt-u8 level apart.
        gap = np.abs(cbrt_codes(row.topk_logprobs) - cbrt_codes(want.topk_logprobs))
        assert gap.max() <= 1
        np.testing.assert_allclose(row.token_logprob, want.token_logprob, rtol=1e-5, atol=1e-6)
    p = result.progress
    assert (p.rows_total, p.rows_done, p.rows_teacher, p.rows_present) == (ROWS, ROWS, ROWS, 0)
    assert (result.workers_restarted, result.workers_lost, result.rows_recomputed) == (0, 0, 0)
    writers = {s.writer_id for s in read_manifest(out).shards}
    assert len(writers) == 2, "both workers publish shards under their own writer ids"


def capture_workers() -> list[int]:
    """Pids of the live Ray capture worker processes (Ray titles them ray::CaptureWorker)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(
                b"ray::CaptureWorker"
            ):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_worker_killed_mid_run_loses_and_doubles_nothing(
    cluster, teacher_model, rows, reference, tmp_path
):
    out = tmp_path / "data" / "ds"
    outcome: list[CaptureResult | BaseException] = []
    answered = threading.Event()

    def progress(p: JobProgress) -> None:
        if p.rows_teacher >= 4 * CHUNK:
            answered.set()

    def run() -> None:
        try:
            # Nothing is published before the end of the pass: the killed worker surely
            # holds rows of chunks it reported done, which must be computed again.
            outcome.append(
                capture(
                    teacher_model,
                    rows,
                    out,
                    workers=2,
                    on_progress=progress,
                    flush_rows=10**6,
                    flush_seconds=3600,
                )
            )
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    assert answered.wait(timeout=300), outcome
    [victim, _] = capture_workers()
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    [result] = outcome
    if isinstance(result, BaseException):
        raise result

    assert result.workers_restarted == 1 and result.workers_lost == 0
    assert result.rows_recomputed >= 1
    assert result.progress.rows_done == ROWS
    assert_each_row_once(out, set(records(reference)))


def test_two_captures_into_one_dataset_at_once_both_land(cluster, teacher_model, tmp_path):
    half = ROWS // 2
    first = write_rows(tmp_path / "first.jsonl", range(0, half))
    second = write_rows(tmp_path / "second.jsonl", range(half, ROWS))
    out = tmp_path / "data" / "ds"
    results: dict[str, CaptureResult] = {}
    # Each capture waits, once its first chunk is published (flush_rows = a chunk), for
    # the other's: a worker's start-up can outlast a whole capture of these few rows.
    both_published = threading.Barrier(2, timeout=300)

    def run(name: str, input: Path) -> None:
        waited = []

        def progress(p: JobProgress) -> None:
            if p.rows_teacher >= CHUNK and not waited:
                waited.append(both_published.wait())

        results[name] = capture(
            teacher_model, input, out, workers=1, on_progress=progress, flush_rows=CHUNK
        )

    threads = [threading.Thread(target=run, args=a) for a in (("a", first), ("b", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert set(results) == {"a", "b"}

    shards = read_manifest(out).shards
    by_writer: dict[str, list[float]] = {}
    for s in shards:
        by_writer.setdefault(s.writer_id, []).append(s.created)
    assert len(by_writer) == 2
    # They really ran at once: each published a shard before the other's last one (the
    # barrier holds back each planner's later chunks until both have one shard out).
    (a, b) = by_writer.values()
    assert min(a) < max(b) and min(b) < max(a)
    assert sum(r.progress.rows_teacher for r in results.values()) == ROWS
    assert read_manifest(out).rows == ROWS
    faults, _ = verify_dataset(out)
    assert faults == []


def test_cli_rerun_on_the_cluster_computes_only_the_missing_rows_and_reports_bad_ones(
    cluster, teacher_model, rows, reference, tmp_path
):
    out = tmp_path / "data" / "ds"
    part = write_rows(tmp_path / "part.jsonl", range(0, ROWS, 2))
    capture(teacher_model, part, out, workers=1)
    # The whole file again, with two rows no teacher can take after it.
    full = tmp_path / "full.jsonl"
    full.write_text(rows.read_text() + '{"prompt": ""}\nnot json\n')

    command = [
        sys.executable,
        "-m",
        "distillcache",
        "cache",
        str(full),
        "--teacher",
        str(teacher_model),
        "--out",
        str(out),
        "--max-tokens",
        str(MAX_TOKENS),
        "--max-failures",
        "2",
        "--ray",
        "--ray-address",
        cluster,
        "--workers",
        "2",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert any(line.startswith(f"{full}:{ROWS + 1}:") for line in lines), lines
    assert any(line.startswith(f"{full}:{ROWS + 2}:") for line in lines), lines
    assert lines[-1].startswith(f"done: {ROWS + 2} rows; {ROWS // 2} by the teacher")
    assert lines[-1].endswith(f"{ROWS // 2} already in {out}, 2 failed")
    assert_each_row_once(out, set(records(reference)))


def test_two_workers_capture_into_s3_each_row_once(cluster, teacher_model, rows, reference):
    uri = f"s3://{BUCKET}/captures/ds"
    result = capture(teacher_model, rows, uri, workers=2, flush_rows=32)

    expected = records(reference)
    assert_each_row_once(uri, set(expected))
    got = records(uri)
    for key, want in expected.items():
        assert got[key].completion_ids.tolist() == want.completion_ids.tolist()
        np.testing.assert_array_equal(got[key].topk_ids, want.topk_ids)
        gap = np.abs(cbrt_codes(got[key].topk_logprobs) - cbrt_codes(want.topk_logprobs))
        assert gap.max() <= 1
    assert result.progress.rows_teacher == ROWS
    assert len({s.writer_id for s in read_manifest(uri).shards}) == 2
    # A rerun through the CLI finds every row published and runs the teacher for none.
    command = [
        *(sys.executable, "-m", "distillcache", "cache", str(rows)),
        *("--teacher", str(teacher_model), "--out", uri, "--max-tokens", str(MAX_TOKENS)),
        *("--ray", "--ray-address", cluster),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = done.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"done: {ROWS} rows; 0 by the teacher")
    assert summary.endswith(f"{ROWS} already in {uri}, 0 failed")


def test_an_s3_out_without_ray_is_a_usage_error_naming_the_fix(tmp_path):
    input = write_rows(tmp_path / "rows.jsonl", range(2))
    result = CliRunner().invoke(
        app, ["cache", str(input), "--teacher", "t", "--out", "s3://b/p/ds"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2
    assert "--out" in result.output and "add --ray" in result.output


def test_a_ray_address_nobody_answers_is_one_line_before_anything_starts(
    teacher_model, tmp_path, capsys
):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    input = write_rows(tmp_path / "rows.jsonl", range(2))
    out = tmp_path / "data" / "ds"
    args = ["cache", str(input), "--teacher", str(teacher_model), "--out", str(out)]
    with pytest.raises(SystemExit) as done:
        main([*args, "--ray", "--ray-address", f"127.0.0.1:{port}"])
    assert done.value.code == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --ray-address 127.0.0.1:{port}: no Ray cluster answers")
    assert not out.parent.exists()
