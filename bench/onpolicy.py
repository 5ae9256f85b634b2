"""On-policy transport: bytes and encode/decode time per scored token, JSON against Arrow.

An on-policy step sends the teacher's answers for every sampled token to the trainer:
top-k ids and log-probs, token and tail log-probs, and the log-probs at the student's
score_ids. This bench builds realistic answers (random ids, sorted log-softmax values,
a cbrt-u8 or float32 codec as the server stores them) and, in the same run, encodes them
as the server does for each transport (``AnswerResponse`` JSON; ``answer_arrow``'s IPC
stream) and decodes them as a client does (``json.loads`` into NumPy arrays; the
trainer's ``teacher_client`` decoder). It prints bytes, encode and decode microseconds
per scored token, and Arrow's ratio against JSON, the baseline.

    python bench/onpolicy.py                      # 32 pairs x 64 tokens, k=32, s=8
    python bench/onpolicy.py --k 64 --codec float32
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from distillcache.services.teacher.answer_arrow import encode_answers
from distillcache.services.teacher.protocol import AnswerResponse, ScoreResponse
from distillcache.services.teacher.service import ScoredAnswer
from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import DatasetInfo
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--score-ids", type=int, default=8)
    parser.add_argument("--codec", default="cbrt-u8", choices=["cbrt-u8", "float16", "float32"])
    parser.add_argument("--repeat", type=int, default=5)
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


if __name__ == "__main__":
    main()
