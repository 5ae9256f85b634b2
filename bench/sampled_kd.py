"""Top-k, adaptive k and sampled sparse logits (RS-KD) at equal bytes, on tiny models.

    python bench/sampled_kd.py --seeds 3

What each mode stores per position of the teacher's distribution ``q`` (T=1), and the
loss the student gets from it:

- ``full``: every log-prob (the baseline no cache stores): forward KL(q || p) exactly.
- ``top-k``: the k most likely ids with their log-probs and the tail bucket (the mass
  outside them): the trainer's forward KL on k + 1 outcomes (``trainer.losses``).
- ``adaptive``: the entries of probability at least ``min_prob`` (at least 1, at most
  64; ``shared.writer.adaptive_counts``) and the bucket, padded and masked as the trainer
  reads an adaptive dataset (``trainer.sparse_kd.unpadded``'s empty slots).
- ``sampled``: RS-KD (Anshumann et al. 2025, "Sparse Logit Sampling"): N draws from
  ``q``, stored as the distinct ids and their counts ``c``; the loss
  ``-sum_i (c_i / N) log p(x_i)`` is an unbiased estimate of the cross-entropy
  ``-sum_x q(x) log p(x)``, so its gradient is an unbiased estimate of forward
  KL(q || p)'s (the teacher's entropy has none). No log-probs and no tail are stored.
  The draws go through the project's own path: drawn by the transformers teacher
  backend (a sampled score query at the teacher temperature, as ``distill cache
  --sampled-draws N --sample-temperature T`` asks it), written as a sampled dataset by
  ``ShardWriter`` (schema version 3), read back by ``ShardDataset`` as the trainer reads
  them, and trained with the trainer's ``sampled_targets`` / ``sampled_cross_entropy``
  (the functions ``sparse_kd.chunked_head_loss`` runs on a sampled dataset); the whole
  dataset's bytes per token are printed beside the per-position figure of the table.

The teacher is a tiny Qwen2 fitted to the synthetic arithmetic task for a few steps (so its
distribution is peaked but has a tail), its outputs softened by ``--teacher-temperature``
(the distribution all modes distil from, so the tail matters); students are tiny Qwen2s
trained on the same batches and steps from the same initial weights per seed. Reported per
mode, mean and spread over seeds: stored bytes per token (zstd Parquet, the shard
encodings: ids sorted and BYTE_STREAM_SPLIT, one-byte cbrt-u8 log-probs, float32 tails,
one-byte counts), mean entries per position, the held-out KL(q || p) to the full teacher
(nats per position), and the student's expected calibration error on held-out text
(15 equal-width bins of its top-1 probability against whether the next token is its top-1;
a student equal to the softened teacher would have the teacher's, printed first), and its
ECE against the teacher (the same bins, a position's accuracy being ``q(argmax p)``, the
chance that a token drawn from the teacher is the student's top-1: zero for a student
equal to the teacher, whatever the teacher's own calibration).
Each budget is N draws for the sampled mode; top-k takes the k whose bytes come closest
to the sampled mode's, adaptive the min_prob that keeps as many entries as that k.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillcache.services.teacher.backend import Query
from distillcache.services.teacher.backend_transformers import TransformersBackend
from distillcache.shared.codec import encode_logprobs, tail_logprob
from distillcache.shared.reader import ShardDataset
from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import AdaptiveK, DatasetInfo, SampledLogits
from distillcache.shared.tiny_models import (
    build_tiny_model,
    chat_texts,
    synthetic_task_rows,
    train_tiny_model,
    train_tokenizer,
)
from distillcache.shared.writer import ShardWriter, adaptive_counts
from distillcache.trainer.losses import (
    forward_kl,
    sampled_cross_entropy,
    sampled_targets,
    student_log_probs,
    teacher_log_probs,
)
from distillcache.trainer.sparse_kd import unpadded

MAX_ADAPTIVE = 64


def world(workdir: Path, teacher_steps: int, teacher_temperature: float):
    """Tokenizer, a fitted teacher, and its full log-probs on train and held-out text."""
    rows = list(synthetic_task_rows(600, seed=1))
    corpus = [f"{r['question']} {r['teacher_solution']}" for r in rows]
    train_tokenizer(corpus, 512, workdir / "tok")
    teacher = build_tiny_model(workdir / "teacher", workdir / "tok", hidden_size=128, seed=7)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    train_tiny_model(teacher, chat_texts(rows[:400], tokenizer), steps=teacher_steps, lr=3e-3)
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()

    def encode(part):
        texts = chat_texts(part, tokenizer)
        out = []
        with torch.no_grad():
            for text in texts:
                ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
                logits = model(ids.unsqueeze(0)).logits[0, :-1].double()
                q = F.log_softmax(logits / teacher_temperature, -1).float()
                out.append((ids, q))
        return out

    return encode(rows[:400]), encode(rows[400:]), len(tokenizer), teacher


def capture_draws(teacher: Path, data, draws: int, temperature: float):
    """RS-KD's stored form, drawn by the project's transformers backend: per sequence,
    per position the distinct drawn ids (padded -1) and their counts (0 there). Each
    sequence is a sampled score query of its first token and the rest, seeded per
    sequence and budget (the service seeds from the cache key)."""
    sampled = SampledLogits(draws=draws, temperature=temperature)
    backend = TransformersBackend(teacher)
    queries = [
        Query("score", (int(ids[0]),), draws, completion_ids=tuple(ids[1:].tolist()),
              sampled=sampled, draw_seed=draws * 1_000_003 + i)
        for i, (ids, _) in enumerate(data)
    ]  # fmt: skip
    try:
        outputs = asyncio.run(backend.score(queries))
    finally:
        asyncio.run(backend.close())
    return [
        (
            torch.from_numpy(out.topk_ids).long(),
            torch.from_numpy(np.rint(np.exp(out.topk_logprobs.astype(np.float64)) * draws)),
        )
        for out in outputs
    ]


def through_shards(data, stored, sampled: SampledLogits, root: Path, vocab: int):
    """The sampled mode as a capture stores it: every sequence's draws (``stored``, from
    ``store``) written as a sampled dataset and read back as the trainer reads it.
    Returns (per sequence the (ids, ln(count / N)) targets, padded -1 / -inf; the
    dataset's bytes per position)."""
    info = DatasetInfo(
        teacher_model="bench-teacher", tokenizer="bench", tokenizer_hash="bench",
        vocab_size=vocab, logit_width=vocab, k=sampled.draws, sampled=sampled,
        logprob_codec="float32", backend="bench", backend_version="0",
    )  # fmt: skip
    draws = sampled.draws
    with ShardWriter(root, info, writer_id="bench") as writer:
        for i, ((ids, q), (drawn, counts)) in enumerate(zip(data, stored, strict=True)):
            width = torch.full((len(q), draws), -1, dtype=torch.long)
            width[:, : drawn.shape[1]] = drawn
            logw = torch.full((len(q), draws), float("-inf"))
            logw[:, : counts.shape[1]] = (counts / draws).log()
            writer.write(
                SequenceRecord(
                    key=f"{i:064x}", prompt_ids=ids[:1].numpy(), completion_ids=ids[1:].numpy(),
                    topk_ids=width.numpy(), topk_logprobs=logw.numpy(),
                    token_logprob=q.gather(1, ids[1:, None])[:, 0].numpy(),
                    tail_logprob=np.full(len(q), -np.inf, np.float32),
                )
            )  # fmt: skip
    dataset = ShardDataset(root)
    by_key = {r.key: r for r in dataset.iter_records(verify=True)}
    targets = [
        (torch.from_numpy(r.topk_ids).long(), torch.from_numpy(r.topk_logprobs))
        for r in (by_key[f"{i:064x}"] for i in range(len(data)))
    ]
    return targets, dataset.manifest.bytes / dataset.manifest.tokens


def top_entries(q_log: torch.Tensor, counts: np.ndarray):
    """Each position's ``counts[j]`` most likely ids, padded with -1 / -inf, and the tail
    (recomputed from the kept float32 log-probs, as the cache captures it)."""
    width = int(counts.max())
    values, ids = q_log.topk(width, dim=-1)
    keep = torch.arange(width) < torch.as_tensor(counts)[:, None]
    ids = ids.masked_fill(~keep, -1)
    values = values.masked_fill(~keep, float("-inf"))
    tail = torch.from_numpy(tail_logprob(values.numpy()))
    return ids, values, tail


def parquet_bytes(columns: dict[str, pa.Array]) -> int:
    """zstd Parquet size of the per-position columns, with the shards' encodings."""
    table = pa.table(columns)
    encodings = {"ids.list.element.list.element": "BYTE_STREAM_SPLIT"}
    if "tail" in columns:
        encodings["tail.list.element"] = "BYTE_STREAM_SPLIT"
    sink = io.BytesIO()
    pq.write_table(
        table, sink, compression="zstd", compression_level=3, use_dictionary=False,
        column_encoding=encodings,
    )  # fmt: skip
    return sink.tell()


def nested(ids: list[np.ndarray], values: list[np.ndarray], dtype) -> tuple[pa.Array, pa.Array]:
    """Per sequence, per position, the entries whose id is not padding (-1), ids sorted
    ascending with their values alongside (the shards' canonical order)."""
    id_out, value_out = [], []
    for row_ids, row_values in zip(ids, values, strict=True):
        order = np.argsort(np.where(row_ids >= 0, row_ids, np.iinfo(np.int64).max), axis=1)
        row_ids = np.take_along_axis(row_ids, order, axis=1)
        row_values = np.take_along_axis(row_values, order, axis=1)
        keep = row_ids >= 0
        id_out.append([r[m].tolist() for r, m in zip(row_ids, keep, strict=True)])
        value_out.append([r[m].tolist() for r, m in zip(row_values, keep, strict=True)])
    return (
        pa.array(id_out, type=pa.list_(pa.list_(pa.int32()))),
        pa.array(value_out, type=pa.list_(pa.list_(dtype))),
    )


def store(mode, data, drawn, k, min_prob):
    """Each sequence's stored form for ``mode`` (sampled: ``drawn``, from
    ``capture_draws``), its bytes per position (zstd Parquet of what the mode stores) and
    its mean entries per position."""
    stored, ids_rows, val_rows, tail_rows = [], [], [], []
    for i, (_, q) in enumerate(data):
        if mode == "sampled":
            ids, counts = drawn[i]
            stored.append((ids, counts))
            ids_rows.append(ids.numpy())
            val_rows.append(counts.numpy().astype(np.uint8))
            continue
        if mode == "top-k":
            n = np.full(len(q), k)
        else:
            top = q.topk(MAX_ADAPTIVE, -1).values.numpy()
            n, _ = adaptive_counts(top, AdaptiveK(min_prob=min_prob))
        ids, values, tail = top_entries(q, n)
        stored.append((ids, values, tail))
        ids_rows.append(ids.numpy())
        val_rows.append(encode_logprobs(values.numpy(), "cbrt-u8"))
        tail_rows.append(tail.numpy())
    entries = sum(int((r >= 0).sum()) for r in ids_rows)
    positions = sum(len(q) for _, q in data)
    id_col, value_col = nested(ids_rows, val_rows, pa.uint8())
    columns = {"ids": id_col, "values": value_col}
    if tail_rows:
        columns["tail"] = pa.array([t.tolist() for t in tail_rows], pa.list_(pa.float32()))
    return stored, parquet_bytes(columns) / positions, entries / positions


def loss_of(mode, logits, target):
    """Summed loss over positions for one sequence's stored target."""
    log_p = F.log_softmax(logits.float(), -1)
    if mode == "full":
        return forward_kl(target, log_p).sum()
    if mode == "sampled":
        ids, empty = unpadded(target[0])
        top = logits.gather(1, ids)
        if empty is not None:
            top = top.masked_fill(empty, float("-inf"))
        rest = logits.scatter(1, ids, float("-inf")).logsumexp(-1)
        student = student_log_probs(top, rest, 1.0, "bucket")
        return sampled_cross_entropy(sampled_targets(target[1], empty), student).sum()
    ids, values, tail = target
    ids, empty = unpadded(ids)
    top = logits.gather(1, ids)
    rest = logits.scatter(1, ids, float("-inf")).logsumexp(-1)
    if empty is not None:
        top = top.masked_fill(empty, float("-inf"))
    teacher = teacher_log_probs(values, tail, 1.0, "bucket", None, empty)
    student = student_log_probs(top, rest, 1.0, "bucket")
    return forward_kl(teacher, student).sum()


def train_student(mode, workdir, tokdir, train, targets, seed, steps, batch):
    student = build_tiny_model(workdir / f"s{seed}", tokdir, hidden_size=64, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(student)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        picks = torch.randint(len(train), (batch,), generator=gen).tolist()
        total, positions = 0.0, 0
        for i in picks:
            ids, _ = train[i]
            logits = model(ids.unsqueeze(0)).logits[0, :-1]
            total = total + loss_of(mode, logits, targets[i])
            positions += len(logits)
        (total / positions).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


@torch.no_grad()
def evaluate(model, held_out):
    """Held-out KL(q || p) per position, ECE against the text's next tokens, and ECE
    against the teacher: a position's "accuracy" is then q(argmax p), the chance that a
    token drawn from the teacher is the student's top-1."""
    kl, n = 0.0, 0
    conf, right, teacher_right = [], [], []
    for ids, q in held_out:
        log_p = F.log_softmax(model(ids.unsqueeze(0)).logits[0, :-1].double(), -1)
        kl += forward_kl(q.double(), log_p).sum().item()
        n += len(q)
        top, arg = log_p.max(-1)
        conf.append(top.exp())
        right.append((arg == ids[1:]).double())
        teacher_right.append(q.double().gather(1, arg.unsqueeze(1)).squeeze(1).exp())
    conf = torch.cat(conf)
    return kl / n, ece(conf, torch.cat(right)), ece(conf, torch.cat(teacher_right))


def ece(conf: torch.Tensor, right: torch.Tensor, bins: int = 15) -> float:
    which = (conf * bins).long().clamp(max=bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.double().mean().item() * abs(conf[sel].mean() - right[sel].mean()).item()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--draws", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--teacher-temperature", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        train, held_out, vocab, teacher = world(
            workdir, args.teacher_steps, args.teacher_temperature
        )
        q = torch.cat([q for _, q in train])
        p = q.exp()
        entropy = -(p * q.clamp(min=-1e30)).sum(-1).mean().item()
        held_q = torch.cat([q for _, q in held_out])
        held_next = torch.cat([ids[1:] for ids, _ in held_out])
        top, arg = held_q.max(-1)
        teacher_ece = ece(top.exp().double(), (arg == held_next).double())
        print(
            f"teacher: vocab {vocab}, {len(q)} train positions, entropy {entropy:.3f} nats,"
            f" top-1 mass {p.max(-1).values.mean():.3f}, held-out ECE {teacher_ece:.4f}"
        )
        print(
            "| budget | mode | B/token | entries/pos | held-out KL (nats/pos) | ECE (text) |"
            " ECE (teacher) |\n| --- | --- | --- | --- | --- | --- | --- |"
        )
        results = {}
        for seed in range(args.seeds):
            model = train_student(
                "full", workdir, workdir / "tok", train, [t for _, t in train], seed,
                args.steps, args.batch,
            )  # fmt: skip
            full = (4.0 * vocab, float(vocab), *evaluate(model, held_out))  # float32 each
            results.setdefault(("-", "full"), []).append(full)
        for draws in args.draws:
            drawn = capture_draws(teacher, train, draws, args.teacher_temperature)
            drawn, s_bytes, s_entries = store("sampled", train, drawn, 0, 0)
            mode = SampledLogits(draws=draws, temperature=args.teacher_temperature)
            sampled, dataset_bytes = through_shards(
                train, drawn, mode, workdir / f"sampled-{draws}", vocab
            )
            print(
                f"N={draws}: the sampled dataset (ShardWriter, every column) holds"
                f" {dataset_bytes:.1f} B/token; the table counts the draws' columns only"
            )
            # The k whose bytes come closest to the sampled mode's.
            k = max(1, round(s_entries) - 2)
            topk, t_bytes, t_entries = store("top-k", train, None, k, 0)
            while t_bytes < s_bytes:
                bigger = store("top-k", train, None, k + 1, 0)
                if abs(bigger[1] - s_bytes) > abs(t_bytes - s_bytes):
                    break
                k, (topk, t_bytes, t_entries) = k + 1, bigger
            # min_prob giving top-k's mean entries (so about its bytes): bisected.
            low, high = 1e-6, 0.5
            for _ in range(30):
                mid = (low * high) ** 0.5
                n, _ = adaptive_counts(
                    q.topk(MAX_ADAPTIVE, -1).values.numpy(), AdaptiveK(min_prob=mid)
                )
                low, high = (mid, high) if n.mean() > t_entries else (low, mid)
            adaptive, a_bytes, a_entries = store("adaptive", train, None, 0, high)
            budget = f"N={draws}"
            modes = {
                "sampled": (sampled, s_bytes, s_entries),
                f"top-k (k={k})": (topk, t_bytes, t_entries),
                f"adaptive (min_prob={high:.3g})": (adaptive, a_bytes, a_entries),
            }
            for name, (targets, b, e) in modes.items():
                kind = name.split(" ")[0]
                for seed in range(args.seeds):
                    model = train_student(
                        kind, workdir, workdir / "tok", train, targets, seed, args.steps,
                        args.batch,
                    )  # fmt: skip
                    results.setdefault((budget, name), []).append(
                        (b, e, *evaluate(model, held_out))
                    )
        for (budget, name), runs in results.items():
            b, e = runs[0][0], runs[0][1]
            kls = [r[2] for r in runs]
            eces = [r[3] for r in runs]
            teacher_eces = [r[4] for r in runs]

            def show(xs):
                spread = statistics.stdev(xs) if len(xs) > 1 else 0.0
                return f"{statistics.mean(xs):.4f} ± {spread:.4f}"

            print(
                f"| {budget} | {name} | {b:.1f} | {e:.2f} | {show(kls)} | {show(eces)} |"
                f" {show(teacher_eces)} |"
            )


if __name__ == "__main__":
    main()
