"""The real `distill` entry point on everyday mistakes: one line, the right exit code,
checked before any model loads, and nothing half-made left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from service_support import DISTILL, question_rows, write_jsonl

from distillcache.shared.manifest import MANIFEST

ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def distill(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DISTILL, *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return errors[0]


def test_version_and_short_help():
    assert distill("--version").stdout.strip().startswith("distill ")
    short = distill("-h")
    assert short.returncode == 0 and "cache" in short.stdout


def test_a_wrong_teacher_path_is_one_line_exit_1_and_creates_nothing(tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", question_rows(2))
    result = distill("cache", str(rows), "--teacher", "./nope", "--out", str(tmp_path / "s/ds"))
    assert result.returncode == 1
    line = one_error_line(result)
    assert "--teacher ./nope: no such directory" in line
    assert not (tmp_path / "s").exists()


def test_an_input_of_unknown_format_is_refused_before_the_teacher_loads(tmp_path, teacher_model):
    rows = tmp_path / "rows.csv"
    rows.write_text("question\nWhat is 1 + 1?\n")
    result = distill(
        "cache", str(rows), "--teacher", str(teacher_model), "--out", str(tmp_path / "s/ds")
    )
    assert result.returncode == 1
    assert "unknown input format" in one_error_line(result)
    assert not (tmp_path / "s").exists()


def test_k_larger_than_the_vocabulary_is_refused_before_the_teacher_loads(tmp_path, teacher_model):
    rows = write_jsonl(tmp_path / "rows.jsonl", question_rows(2))
    vocab = json.loads((teacher_model / "config.json").read_text())["vocab_size"]
    result = distill(
        "cache",
        str(rows),
        "--teacher",
        str(teacher_model),
        "--out",
        str(tmp_path / "s/ds"),
        "--k",
        str(vocab + 1),
    )
    assert result.returncode != 0
    assert "--k" in result.stderr or "max_k" in result.stderr
    assert not (tmp_path / "s" / "ds").exists()


@pytest.mark.slow
def test_rows_that_all_fail_exit_1_leave_no_dataset_and_a_rerun_with_other_settings_is_refused(
    tmp_path, teacher_model
):
    out = tmp_path / "store" / "ds"
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"query": "no prompt field"}] * 3)
    base = ["--teacher", str(teacher_model), "--out", str(out), "--k", "4"]
    result = distill("cache", str(wrong), *base, "--max-tokens", "4")
    assert result.returncode == 1
    assert "3 failed" in result.stderr and "--max-failures 0" in result.stderr
    assert not out.exists(), "a failed first run left a dataset that fixes k and the teacher"

    allowed = distill("cache", str(wrong), *base, "--max-tokens", "4", "--max-failures", "3")
    assert allowed.returncode == 0, allowed.stderr

    good = write_jsonl(tmp_path / "good.jsonl", question_rows(2))
    stored = distill("cache", str(good), *base, "--max-tokens", "4")
    assert stored.returncode == 0
    assert f"data root {out.parent} " in stored.stderr.splitlines()[0]
    assert (out / MANIFEST).exists()
    other = distill("cache", str(good), *base, "--max-tokens", "8")
    assert other.returncode == 1
    line = one_error_line(other)
    assert "max_tokens 4 (now 8)" in line and "use a new --out" in line


def test_serve_with_a_model_that_cannot_load_exits_1(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    result = distill(
        "serve",
        "--model",
        str(broken),
        "--data-root",
        str(tmp_path / "data"),
        "--port",
        "0",
        timeout=240,
    )
    assert result.returncode == 1
    # The server logged the loading traceback; its last word is the one-line error.
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the teacher {broken} failed to load: ")


def test_a_python_module_run_is_the_same_entry_point(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "distillcache",
            "cache",
            str(tmp_path / "x.jsonl"),
            "--teacher",
            "./nope",
            "--out",
            str(tmp_path / "ds"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert result.returncode == 2  # INPUT does not exist: a usage error
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
