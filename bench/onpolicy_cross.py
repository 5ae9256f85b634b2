"""Cross-tokenizer on-policy steps: their time against same-tokenizer on-policy steps.

A tiny teacher (``shared/tiny_models.py``, Qwen2 shape, 64 wide) on SmolLM2's real
tokenizer is served for real (``distill serve``, transformers backend); its shards of the
synthetic task give the prompts. Then, one after the other in this process, the same
number of on-policy steps (L = 1, reverse KL, score_ids 8) of:

1. a student on SmolLM2's tokenizer, same-tokenizer on-policy: the baseline;
2. the same student with ``--cross-tokenizer`` (one tokenizer on both sides: the same
   samples and requests, the aligned batch and the chunk loss);
3. a student of the same shape on GPT-2's tokenizer with ``--cross-tokenizer``: its text
   is encoded for the teacher, aligned, and asked about at 1:1 chunks.

Each run's metrics give the seconds per step split into sample, score (encoding the text
for the teacher, the HTTP call, the alignment) and train; steps after the first (warm-up)
are averaged. Printed: each phase and the whole step, and each run's step against the
baseline's.

    OMP_NUM_THREADS=1 python bench/onpolicy_cross.py --steps 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distillcache.services.teacher.readiness import free_port, wait_ready
from distillcache.shared.model_source import real_tokenizer
from distillcache.shared.tiny_models import build_tiny_model, synthetic_task_rows
from distillcache.trainer.config import TrainConfig
from distillcache.trainer.loop import train


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
    parser.add_argument("--cache-dir", default=".cache", help="Where real tokenizers are built.")
    args = parser.parse_args()
    cache = Path(args.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        smol, gpt2 = real_tokenizer("smollm2", cache), real_tokenizer("gpt2", cache)
        teacher = build_tiny_model(root / "teacher", smol, hidden_size=64, num_heads=2, seed=7)
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
            shards = write_shards(url, data, synthetic_task_rows(32, seed=1), args.new_tokens)
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


if __name__ == "__main__":
    main()
