"""Cross-tokenizer on-policy steps: their time, and what they teach, against same-tokenizer ones.

A tiny teacher (``shared/tiny_models.py``, Qwen2 shape, 64 wide) on SmolLM2's real
tokenizer, fitted to the synthetic task (60 AdamW steps), is served for real (``distill
serve``, transformers backend); its shards of the task give the prompts.

Part 1, time. One after the other in this process, the same number of on-policy steps
(L = 1, reverse KL, score_ids 8) of:

1. a student on SmolLM2's tokenizer, same-tokenizer on-policy: the baseline;
2. the same student with ``--cross-tokenizer`` (one tokenizer on both sides: the same
   samples and requests, the aligned batch and the chunk loss);
3. a student of the same shape on GPT-2's tokenizer with ``--cross-tokenizer``: its text
   is encoded for the teacher, aligned, and asked about at 1:1 chunks.

Each run's metrics give the seconds per step split into sample, score (encoding the text
for the teacher, the HTTP call, the alignment) and train; steps after the first (warm-up)
are averaged. Printed: each phase and the whole step, and each run's step against the
baseline's.

Part 2, learning (``--learning-steps N``, 0 skips it): students trained N on-policy steps
(L = 1, lr 1e-2), same tokenizer against ``--cross-tokenizer``, with and without
score_ids, reverse and forward KL; each measured before and after by the sequence-level
reverse KL(student || teacher) on its own samples of 24 held-out prompts
(``tests/sequence_kl.py``: float64, both models' full forward passes, no service). The
baseline is each student's own start.

    OMP_NUM_THREADS=1 python bench/onpolicy_cross.py --steps 8 --learning-steps 60
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from distillcache.services.teacher.readiness import free_port, wait_ready
from distillcache.shared.model_source import real_tokenizer
from distillcache.shared.tiny_models import (
    build_tiny_model,
    chat_texts,
    synthetic_task_rows,
    train_tiny_model,
)
from distillcache.trainer.config import TrainConfig
from distillcache.trainer.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sequence_kl import sequence_reverse_kl  # noqa: E402

# Part 2's runs: (student, --cross-tokenizer, loss, score_top).
LEARNING_RUNS = (
    ("smol", False, "reverse_kl", 8),
    ("smol", True, "reverse_kl", 0),
    ("smol", True, "reverse_kl", 8),
    ("gpt2", True, "reverse_kl", 0),
    ("gpt2", True, "reverse_kl", 8),
    ("gpt2", True, "forward_kl", 0),
    ("gpt2", True, "forward_kl", 8),
)


def write_shards(url: str, data: Path, rows: list[dict], new_tokens: int) -> Path:
    """The teacher's shards of ``rows`` (its batch job), for the runs' prompts."""
    import httpx

    (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    body = {"input": "rows.jsonl", "output": "shards", "max_tokens": new_tokens}
    job = httpx.post(f"{url}/v1/jobs", json=body).json()
    while job["state"] not in ("done", "failed", "cancelled"):
        time.sleep(0.5)
        job = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
    if job["state"] != "done":
        raise RuntimeError(f"the shard job ended {job['state']}: {job}")
    return data / "shards"


def run(name: str, out: Path, **settings) -> dict[str, float]:
    """Train, then the mean seconds per step after the first, per phase."""
    train(TrainConfig(output_dir=str(out), **settings))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "time/sample_s" in r][1:]
    phases = {p: sum(r[f"time/{p}_s"] for r in steps) / len(steps) for p in ("sample", "score")}
    phases["train"] = sum(r["time/train_s"] for r in steps) / len(steps)
    phases["step"] = sum(phases.values())
    print(json.dumps({name: phases}), flush=True)
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--learning-steps", type=int, default=60, help="Part 2 (0: skip).")
    parser.add_argument("--cache-dir", default=".cache", help="Where real tokenizers are built.")
    args = parser.parse_args()
    cache = Path(args.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        smol, gpt2 = real_tokenizer("smollm2", cache), real_tokenizer("gpt2", cache)
        teacher = build_tiny_model(root / "teacher", smol, hidden_size=64, num_heads=2, seed=7)
        task = list(synthetic_task_rows(200, seed=2))
        train_tiny_model(teacher, chat_texts(task, AutoTokenizer.from_pretrained(teacher)), 60)
        students = {
            "smol": build_tiny_model(root / "smol", smol, hidden_size=64, num_heads=2, seed=5),
            "gpt2": build_tiny_model(root / "gpt2", gpt2, hidden_size=64, num_heads=2, seed=5),
        }
        data = root / "served"
        data.mkdir()
        port = free_port()
        distill = str(Path(sys.executable).parent / "distill")
        serve = ["serve", "--model", str(teacher), "--data-root", str(data), "--max-k", "64"]
        serve += ["--default-k", "8", "--backend", "transformers", "--dtype", "float32"]
        serve += ["--host", "127.0.0.1", "--port", str(port)]
        log = open(root / "server.log", "wb")
        server = subprocess.Popen([distill, *serve], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, timeout=600, process=server)
            shards = write_shards(url, data, task[:40], args.new_tokens)
            common = dict(
                data=str(shards),
                loss="reverse_kl",
                batch_size=args.batch_size,
                max_steps=args.steps,
                lr=3e-3,
                max_length=256,
                log_every=1,
                progress=False,
                tensorboard=False,
                on_policy_fraction=1.0,
                teacher_url=url,
                sample_max_new_tokens=args.new_tokens,
                score_top=8,
                vocab_map_dir=str(root / "maps"),
            )
            runs = {
                "same tokenizer (SmolLM2), on-policy": run(
                    "same", root / "same", student=str(students["smol"]), **common
                ),
                "--cross-tokenizer, SmolLM2 on both sides": run(
                    "cross-same",
                    root / "cross-same",
                    student=str(students["smol"]),
                    cross_tokenizer=True,
                    **common,
                ),
                "--cross-tokenizer, GPT-2 student": run(
                    "cross-gpt2",
                    root / "cross-gpt2",
                    student=str(students["gpt2"]),
                    cross_tokenizer=True,
                    **common,
                ),
            }
            learned = {}
            questions = [r["question"] for r in synthetic_task_rows(24, seed=99)]
            for student, cross, loss, score_top in LEARNING_RUNS if args.learning_steps else ():
                out = root / f"learn-{student}-{cross}-{loss}-{score_top}"
                settings = {**common, "max_steps": args.learning_steps, "lr": 1e-2, "loss": loss}
                settings.update(cross_tokenizer=cross, score_top=score_top)
                train(TrainConfig(output_dir=str(out), student=str(students[student]), **settings))
                before = sequence_reverse_kl(students[student], teacher, questions)
                after = sequence_reverse_kl(out, teacher, questions)
                learned[student, cross, loss, score_top] = (before, after)
                print(json.dumps({out.name: [before, after]}), flush=True)
        finally:
            server.terminate()
            server.wait()
            log.close()
    base = next(iter(runs.values()))["step"]
    print(f"\n{args.steps} on-policy steps of {args.batch_size} samples, <= {args.new_tokens} new")
    print("| run | s/step | sample | score | train | vs same tokenizer |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, t in runs.items():
        print(
            f"| {name} | {t['step']:.3f} | {t['sample']:.3f} | {t['score']:.3f} | "
            f"{t['train']:.3f} | {t['step'] / base:.2f} |"
        )
    if learned:
        print(f"\n{args.learning_steps} on-policy steps, lr 1e-2: sequence-level reverse KL (nats)")
        print("| student | --cross-tokenizer | loss | score_top | start | end | end / start |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
        for (student, cross, loss, score_top), (before, after) in learned.items():
            print(
                f"| {student} | {'yes' if cross else 'no'} | {loss} | {score_top} | "
                f"{before:.2f} | {after:.2f} | {after / before:.2f} |"
            )


if __name__ == "__main__":
    main()
