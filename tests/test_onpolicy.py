"""On-policy (GKD) training through a real teacher server over a tiny teacher.

The teacher is served for real (uvicorn, transformers backend); the student samples, the
server scores with the student's top-N as score_ids and stores every sample in the run's
dataset. The quality check's reference is independent: a dense float64 reverse KL
computed here from both models' full logits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from service_support import DISTILL, thread_server
from trainer_support import max_weight_difference, task_tokenizer, tiny_model, write_teacher_shards
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from distillcache.cli import app
from distillcache.services.teacher.readiness import free_port, wait_ready
from distillcache.services.teacher.settings import TeacherSettings
from distillcache.shared.inputs import render_prompt, user_turn
from distillcache.shared.reader import ShardDataset
from distillcache.shared.tiny_models import synthetic_task_rows
from distillcache.trainer.config import TrainConfig
from distillcache.trainer.loop import train
from distillcache.trainer.student import TokenizerMismatch
from distillcache.trainer.teacher_client import TeacherClient, TeacherUnavailable

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A task tokenizer, a tiny teacher behind a real server, its shards, a tiny student."""
    root = tmp_path_factory.mktemp("onpolicy")
    tokenizer = task_tokenizer(root / "tokenizer")
    rows = list(synthetic_task_rows(60, seed=1))
    teacher = tiny_model(root / "teacher", tokenizer, hidden=64, seed=3)
    shards = write_teacher_shards(teacher, rows, root / "shards", k=8)
    student = tiny_model(root / "student", tokenizer, hidden=64, seed=5)
    settings = TeacherSettings(
        model=str(teacher), data_root=root / "served", max_k=64, default_k=8, flush_rows=1
    )
    with thread_server(settings) as url:
        yield {
            "root": root,
            "tokenizer": tokenizer,
            "teacher": teacher,
            "shards": shards,
            "student": student,
            "url": url,
            "served": root / "served",
        }


def config(world, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        data=str(world["shards"]),
        student=str(world["student"]),
        output_dir=str(out),
        loss="reverse_kl",
        batch_size=4,
        max_steps=4,
        lr=3e-3,
        warmup_steps=1,
        max_length=96,
        chunk_size=64,
        log_every=1,
        progress=False,
        tensorboard=False,
        on_policy_fraction=1.0,
        teacher_url=world["url"],
        sample_max_new_tokens=12,
        score_top=8,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_run_resumes_exactly_and_stores_every_sample(world, tmp_path):
    straight = train(config(world, tmp_path / "straight", on_policy_fraction=0.6))
    train(config(world, tmp_path / "resumed", on_policy_fraction=0.6, stop_at_step=2))
    resumed = train(config(world, tmp_path / "resumed", on_policy_fraction=0.6, resume="auto"))
    assert max_weight_difference(straight, resumed) <= 1e-6
    logged = [r for r in metrics(tmp_path / "straight") if "onpolicy/teacher_tokens" in r]
    assert sum(r["onpolicy/teacher_tokens"] for r in logged) > 0
    assert all(r["time/sample_s"] >= 0 and r["time/score_s"] >= 0 for r in logged)
    on_steps = [r["step"] for r in logged if r["onpolicy/teacher_tokens"] > 0]
    assert 0 < len(on_steps) < 4, "0.6 draws a mix of on- and off-policy steps"
    rows = list(ShardDataset(world["served"] / "onpolicy-straight").iter_records())
    assert {r.meta["step"] for r in rows} == {s - 1 for s in on_steps}
    assert len(rows) == 4 * len(on_steps)


def test_teacher_down_is_one_line_naming_the_url():
    client = TeacherClient("http://127.0.0.1:9", max_retries=2, backoff_s=0.01)
    pair = {"prompt_ids": [1, 2], "completion_ids": [3]}
    with pytest.raises(TeacherUnavailable, match=r"teacher at http://127.0.0.1:9 did not answer"):
        client.score([pair], k=None, dataset=None)


def _held_out_reverse_kl(world, student_dir: Path, prompts: list[list[int]]) -> float:
    """Dense float64 reverse KL(student || teacher) per token on the student's own samples
    (seeded), from both models' full logits: independent of the service and the loss."""
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(world["teacher"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    vocab = len(tokenizer)
    total, count = 0.0, 0
    torch.manual_seed(1234)
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = student.generate(
                ids,
                do_sample=True,
                top_k=0,
                max_new_tokens=12,
                pad_token_id=tokenizer.eos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            seq, n = out, out.shape[1] - len(prompt)
            positions = slice(len(prompt) - 1, len(prompt) - 1 + n)
            s = torch.log_softmax(student(seq).logits[0, positions, :vocab].double(), -1)
            t = torch.log_softmax(teacher(seq).logits[0, positions, :vocab].double(), -1)
            total += float((s.exp() * (s - t)).sum())
            count += n
    return total / count


@pytest.mark.slow
def test_on_policy_beats_off_policy_on_the_students_own_samples(world, tmp_path, record_property):
    tokenizer = AutoTokenizer.from_pretrained(world["student"])
    held_out = [
        render_prompt(tokenizer, user_turn(r["question"])) for r in synthetic_task_rows(12, seed=99)
    ]
    gaps = []
    for seed in (0, 1, 2):
        kl = {}
        for fraction in (0.0, 1.0):
            out = tmp_path / f"s{seed}-l{fraction}"
            train(config(world, out, seed=seed, on_policy_fraction=fraction, max_steps=12))
            kl[fraction] = _held_out_reverse_kl(world, out, held_out)
        gaps.append(kl[0.0] - kl[1.0])
        record_property(f"reverse_kl_seed{seed}", kl)
    gaps = np.array(gaps)
    assert (gaps > 0).all() and gaps.min() > gaps.max() - gaps.min(), gaps


@contextmanager
def _serve(world, data: Path, port: int, log: Path):
    """``distill serve`` over the world's teacher on a fixed port (a restart keeps the URL)."""
    args = ["--model", str(world["teacher"]), "--data-root", str(data), "--max-k", "64"]
    args += ["--default-k", "8", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [DISTILL, "serve", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DISTILL_FLUSH_ROWS": "1", "OMP_NUM_THREADS": "1"},
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}", process=process)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.mark.slow
def test_teacher_killed_mid_run_then_restarted_finishes_with_no_sample_scored_twice(
    world, tmp_path
):
    port, data, log = free_port(), tmp_path / "served", tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "run"
    run = config(world, out, teacher_url=url, max_steps=6, save_every=1)
    with _serve(world, data, port, log) as process:
        killer_done = threading.Event()

        def kill_after_two_steps() -> None:
            # The trainer's own published state: eight stored rows only say the second
            # step was scored, not that its answer reached the trainer.
            while not (out / "checkpoint-2").exists() and process.poll() is None:
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            killer_done.set()

        threading.Thread(target=kill_after_two_steps, daemon=True).start()
        with pytest.raises(TeacherUnavailable, match=f"teacher at {url} did not answer"):
            train(run)
        assert killer_done.wait(60)
    assert (out / "checkpoint-2").exists() and not (out / "model.safetensors").exists()
    with _serve(world, data, port, log):
        train(run.model_copy(update={"resume": "auto"}))
    rows = list(ShardDataset(data / "onpolicy-run").iter_records())
    samples = [(r.meta["step"], r.meta["micro"], r.meta["row"]) for r in rows]
    assert sorted(samples) == [(s, 0, i) for s in range(6) for i in range(4)]
    scored = sum(r.get("onpolicy/teacher_tokens", 0) for r in metrics(out))
    assert scored <= sum(len(r.completion_ids) for r in rows), "a sample was scored twice"
    straight = train(config(world, tmp_path / "straight", max_steps=6))
    assert max_weight_difference(straight, out) <= 1e-6


def test_a_busy_teacher_is_waited_for_as_its_retry_after_says(world, tmp_path):
    settings = TeacherSettings(
        model=str(world["teacher"]), data_root=tmp_path / "data", queue_size=1, max_batch_size=1
    )
    stop, saturated = threading.Event(), threading.Event()

    def keep_busy(url: str, i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            n = 0
            while not stop.is_set():
                n += 1
                body = {"prompt_ids": [5, i, n % 300], "max_tokens": 48, "cache": "bypass"}
                if c.post("/v1/generate", json=body).status_code == 429:
                    saturated.set()

    with thread_server(settings) as url:
        threads = [threading.Thread(target=keep_busy, args=(url, i)) for i in range(6)]
        for t in threads:
            t.start()
        client = TeacherClient(url)

        def ease_off() -> None:
            # Once the client has been refused, the load stops so that its retry gets in
            # (six loaders against a queue of one could otherwise starve it for good).
            while not stop.is_set() and client.busy_waits == 0:
                stop.wait(0.01)
            stop.set()

        watcher = threading.Thread(target=ease_off)
        watcher.start()
        try:
            assert saturated.wait(120), "six loaders never filled a queue of one"
            # A request can still slip into a slot freed a moment before; ask again (other
            # text, so no cache hit) until the client has been refused once.
            for attempt in range(10):
                pair = {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5 + attempt]}
                scored, call = client.score([pair], k=4, dataset=None)
                if client.busy_waits:
                    break
        finally:
            stop.set()
            watcher.join()
            for t in threads:
                t.join()
            client.close()
    assert client.busy_waits > 0, "the queue of 1 never refused the client"
    assert scored[0].topk_ids.shape == (2, 4) and call.scored_tokens == 2


def _cli_train(world, out: Path, prompts: Path, *extra: str):
    """``distill train`` with no --data: the student's own samples of ``prompts`` only."""
    args = ["train", "--student", str(world["student"]), "--output-dir", str(out)]
    args += ["--on-policy-fraction", "1", "--prompts", str(prompts)]
    args += ["--teacher-url", world["url"], "--loss", "reverse_kl", "--batch-size", "4"]
    args += ["--max-steps", "4", "--lr", "3e-3", "--warmup-steps", "1", "--max-length", "96"]
    args += ["--chunk-size", "64", "--sample-max-new-tokens", "12", "--log-every", "1"]
    args += ["--no-progress", "--no-tensorboard", *extra]
    return CliRunner().invoke(app, args)


def _write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"prompt": r["question"]}) + "\n" for r in rows))
    return path


def _union_reverse_kl(world, student_dir: Path, rows, score_top: int, k: int) -> float:
    """Reverse KL(student || teacher) per token on stored samples, in float64 from both
    models' full logits, on what the on-policy loss sees: per position the union of the
    student's top-``score_top`` and the teacher's top-``k`` ids, plus one bucket for the
    rest of each side's mass. Independent of the service, its codec and the trainer."""
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(world["teacher"], dtype=torch.float32).eval()
    vocab = len(AutoTokenizer.from_pretrained(student_dir))
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            seq = torch.tensor([list(row.prompt_ids) + list(row.completion_ids)])
            n, start = len(row.completion_ids), len(row.prompt_ids) - 1
            s = torch.log_softmax(student(seq).logits[0, start : start + n, :vocab].double(), -1)
            t = torch.log_softmax(teacher(seq).logits[0, start : start + n, :vocab].double(), -1)
            for ps, pt in zip(s.exp(), t.exp(), strict=True):
                union = set(ps.topk(score_top).indices.tolist()) | set(pt.topk(k).indices.tolist())
                ids = torch.tensor(sorted(union))
                q = torch.cat([ps[ids], (1 - ps[ids].sum()).clamp_min(0).view(1)])
                p = torch.cat([pt[ids], (1 - pt[ids].sum()).clamp_min(1e-300).view(1)])
                kept = q > 0
                total += float((q[kept] * (q[kept].log() - p[kept].log())).sum())
            count += n
    return total / count


def test_on_policy_only_run_without_data_trains_stores_evaluates_and_resumes(world, tmp_path):
    prompts = _write_prompts(tmp_path / "prompts.jsonl", synthetic_task_rows(20, seed=7))
    exact = ("--eval-fraction", "0.25", "--score-top", "64")
    result = _cli_train(world, tmp_path / "only-straight", prompts, *exact)
    assert result.exit_code == 0, result.output
    stopped = _cli_train(world, tmp_path / "only-resumed", prompts, *exact, "--stop-at-step", "2")
    assert stopped.exit_code == 0, stopped.output
    resumed = _cli_train(world, tmp_path / "only-resumed", prompts, *exact, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert max_weight_difference(tmp_path / "only-straight", tmp_path / "only-resumed") <= 1e-6

    rows = list(ShardDataset(world["served"] / "onpolicy-only-straight").iter_records())
    trained = sorted((r.meta["step"], r.meta["row"]) for r in rows if "step" in r.meta)
    assert trained == [(step, i) for step in range(4) for i in range(4)]
    held = [r for r in rows if r.meta.get("eval_step") == 4]
    assert len(held) == 5, "a quarter of 20 prompts is held out and scored once, at the end"
    assert not {tuple(r.prompt_ids) for r in held} & {
        tuple(r.prompt_ids) for r in rows if "step" in r.meta
    }, "held-out prompts are never trained on"
    final = [r for r in metrics(tmp_path / "only-straight") if "eval/reverse_kl" in r]
    assert [r["step"] for r in final] == [4]
    reference = _union_reverse_kl(world, tmp_path / "only-straight", held, score_top=64, k=8)
    assert final[0]["eval/reverse_kl"] == pytest.approx(reference, rel=1e-4, abs=1e-5)
    again = [r for r in metrics(tmp_path / "only-resumed") if "eval/reverse_kl" in r]
    assert again[0]["eval/reverse_kl"] == pytest.approx(final[0]["eval/reverse_kl"], rel=1e-5)


def test_a_student_of_another_tokenizer_is_refused_by_the_served_teachers(world, tmp_path):
    other = tiny_model(tmp_path / "student", task_tokenizer(tmp_path / "tok", n_rows=60), seed=5)
    prompts = _write_prompts(tmp_path / "prompts.jsonl", synthetic_task_rows(4, seed=7))
    run = config(world, tmp_path / "run", data=None, prompts=str(prompts), student=str(other))
    with pytest.raises(TokenizerMismatch, match=f"the teacher at {world['url']} serves"):
        train(run)
    assert not (tmp_path / "run").exists(), "refused before anything was written"


def test_warmup_steps_read_the_shards_then_the_fraction_applies(world, tmp_path):
    out = tmp_path / "warmup"
    train(config(world, out, on_policy_warmup_steps=2))
    # Asked of the teacher: scored fresh, or answered from its cache (another test of this
    # module may have asked for the same samples).
    asked = {
        r["step"]: r["onpolicy/teacher_tokens"] + r["onpolicy/cache_tokens"]
        for r in metrics(out)
        if "onpolicy/teacher_tokens" in r
    }
    assert asked[1] == asked[2] == 0 and asked[3] > 0 and asked[4] > 0
    rows = list(ShardDataset(world["served"] / "onpolicy-warmup").iter_records())
    assert {r.meta["step"] for r in rows} == {2, 3}


def test_a_run_without_data_evaluates_on_a_held_out_dataset_as_any_run(world, tmp_path):
    prompts = _write_prompts(tmp_path / "prompts.jsonl", synthetic_task_rows(8, seed=7))
    out = tmp_path / "only-shards-eval"
    shards = str(world["shards"])
    train(config(world, out, data=None, prompts=str(prompts), eval_data=shards, max_steps=1))
    [final] = [r for r in metrics(out) if "eval/kl" in r]
    assert final["eval/tokens"] > 0 and "eval/reverse_kl" not in final
