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

Part 2, steps (``--steps N``, 0 skips it): a real ``distill serve`` over a tiny teacher
(built offline), its batch job writing the shards, then a tiny student trained N steps
off-policy (L=0, the baseline) and N steps on-policy (L=1) in the same run. It prints
seconds per step split into sample / score / train, teacher tokens per step, and the
on-policy step's time as a ratio of the off-policy one.

    python bench/onpolicy.py                      # 32 pairs x 64 tokens, k=32, s=8
    python bench/onpolicy.py --k 64 --codec float32 --steps 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

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


def bench_steps(steps: int, batch_size: int, new_tokens: int) -> None:
    """Part 2: off- and on-policy steps of a tiny student against a real teacher server."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = list(synthetic_task_rows(200, seed=0))
        corpus = [f"{r['question']} {r['teacher_solution']}" for r in rows]
        train_tokenizer(corpus, 512, root / "tok")
        teacher = build_tiny_model(root / "teacher", root / "tok", hidden_size=128, seed=7)
        student = build_tiny_model(root / "student", root / "tok", hidden_size=64, seed=5)
        data = root / "served"
        data.mkdir()
        (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        port = free_port()
        distill = str(Path(sys.executable).parent / "distill")
        args = ["serve", "--model", str(teacher), "--data-root", str(data), "--max-k", "32"]
        args += ["--default-k", "16", "--host", "127.0.0.1", "--port", str(port)]
        log = open(root / "server.log", "wb")
        server = subprocess.Popen([distill, *args], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process=server)
            job = httpx.post(
                f"{url}/v1/jobs", json={"input": "rows.jsonl", "output": "shards", "max_tokens": 24}
            ).json()
            while job["state"] not in ("done", "failed", "cancelled"):
                time.sleep(0.5)
                job = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
            if job["state"] != "done":
                raise RuntimeError(f"the shard job ended {job['state']}: {job}")
            results = {}
            for fraction in (0.0, 1.0):
                out = root / f"run-{fraction}"
                config = TrainConfig(
                    data=str(data / "shards"),
                    student=str(student),
                    output_dir=str(out),
                    loss="reverse_kl",
                    batch_size=batch_size,
                    max_steps=steps,
                    max_length=128,
                    lr=3e-3,
                    log_every=1,
                    progress=False,
                    tensorboard=False,
                    on_policy_fraction=fraction,
                    teacher_url=url,
                    sample_max_new_tokens=new_tokens,
                )
                start = time.perf_counter()
                train(config)
                elapsed = time.perf_counter() - start
                logged = [
                    json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                ]
                results[fraction] = (elapsed, [r for r in logged if "train/loss" in r])
        finally:
            server.terminate()
            server.wait()
            log.close()
    print(f"\n{steps} steps x {batch_size} rows, tiny student (64 wide) and teacher (128 wide)")
    print(f"{'run':<14}{'s/step':>9}{'sample':>9}{'score':>9}{'train':>9}{'teacher tok/step':>18}")
    for fraction, (elapsed, logged) in results.items():
        split = [
            sum(r.get(f"time/{p}_s", 0.0) for r in logged) / steps
            for p in ("sample", "score", "train")
        ]
        tokens = sum(r.get("onpolicy/teacher_tokens", 0.0) for r in logged) / steps
        name = "off (L=0)" if fraction == 0 else "on (L=1)"
        cells = "".join(f"{v:>9.3f}" for v in split) if fraction else " " * 27
        print(f"{name:<14}{elapsed / steps:>9.3f}{cells}{tokens:>18.1f}")
    print(f"on-policy step / off-policy step: {results[1.0][0] / results[0.0][0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--score-ids", type=int, default=8)
    parser.add_argument("--codec", default="cbrt-u8", choices=["cbrt-u8", "float16", "float32"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="Part 2's steps (0: skip).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
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
        bench_steps(args.steps, args.batch_size, args.new_tokens)


if __name__ == "__main__":
    main()
