"""GPU check: the teacher backends and a training step's loss on one device, in one run.

For a machine with CUDA PyTorch but no network (no model hub); scripts/gpu_check.sh
prepares the rest. It builds a local Qwen2-style model (hidden 512, 8 layers, a
32,000-token BPE tokenizer padded to 32,768 logit rows, as Qwen pads its head; the
padding rows are scaled copies of real ones, so a backend that normalizes or samples
over them is plainly wrong), then measures:

- generation: tokens/s of the transformers teacher backend without capture (k=0) and
  with top-k capture (k=64), with plain ``model.generate`` as a reference, on the same
  greedy prompts in one batch;
- vLLM against transformers, where vLLM is installed: vLLM's greedy generations and
  vLLM's scoring of them (prompt log-probs) against the transformers backend scoring the
  same tokens. This is the check of what only ran on vLLM's CPU runner before: the
  worker extension that cuts the logits to the tokenizer, and the k + 1 layout of
  vLLM's log-probs (on GPU vLLM 0.32 runs Model Runner V2, here compiled and with CUDA
  graphs, as the service runs it). It fails on a padding id in any output, a greedy
  token whose log-prob is not the top-1's (a shifted layout), or a mean log-prob offset
  above 0.02 nats (a different normalizer);
- a trainer step at a Qwen2.5-0.5B-sized head (vocabulary 151,936, hidden 896, 4 x 1024
  tokens, k=64): bench/loss.py's time and peak memory of plain cross-entropy, naive
  dense KD and the trainer's chunked sparse KD (bf16 autocast on CUDA).

It prints one table and exits non-zero when a loss or a log-prob is not finite, a
captured distribution is malformed or the backends disagree. Sized for a few minutes on
one GPU; ``--device cpu`` runs a much smaller configuration as a smoke test.

    python scripts/gpu_check.py                 # cuda
    python scripts/gpu_check.py --device cpu    # quick local smoke
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillcache.services.teacher.backend import Query, TeacherOutput
from distillcache.services.teacher.backend_transformers import TransformersBackend
from distillcache.shared.schema import Sampling
from distillcache.shared.tiny_models import build_tiny_model, synthetic_task_rows, train_tokenizer

BENCH_LOSS = Path(__file__).resolve().parents[1] / "bench" / "loss.py"
# Largest mean difference of the same token's log-prob between the backends: float
# rounding averages out, a normalizer over the wrong width does not.
MAX_MEAN_OFFSET = 0.02


@dataclass(frozen=True)
class Config:
    """Sizes of one run. The GPU sizes are a real (if small) workload; the CPU ones only
    prove the path runs."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    padded_vocab: int
    gen_batch: int
    gen_tokens: int
    max_k: int
    # bench/loss.py: the head of one training step (vocabulary x hidden) on batch x seq.
    head_vocab: int
    head_hidden: int
    head_batch: int
    head_seq: int
    head_steps: int


GPU = Config(512, 8, 8, 2, 1536, 32_000, 32_768, 32, 128, 64, 151_936, 896, 4, 1024, 5)
CPU = Config(128, 2, 2, 2, 256, 4_000, 4_096, 8, 32, 64, 8_192, 128, 2, 128, 2)


@dataclass
class Row:
    phase: str
    tokens_per_s: float
    ms: float
    peak_mib: float | None


def synthetic_corpus(n_lines: int, seed: int = 0) -> list[str]:
    """Random words with a Zipf-like reuse: enough distinct merges for a 32k BPE vocabulary."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(60_000)]
    cumulative = list(accumulate(1.0 / (rank + 1) ** 0.8 for rank in range(len(words))))
    return [" ".join(rng.choices(words, cum_weights=cumulative, k=40)) for _ in range(n_lines)]


def build_model(cfg: Config, out_dir: Path, dtype: torch.dtype) -> Path:
    """The check's teacher. Its padding logit rows are 3x copies of real rows, so at
    most positions some padding column outscores every real token: a backend that
    does not cut the logits to the tokenizer shows padding ids and a shifted normalizer."""
    rows = list(synthetic_task_rows(200))
    texts = [f"{r['question']} {r['teacher_solution']}" for r in rows]
    train_tokenizer(texts + synthetic_corpus(20_000), cfg.vocab, out_dir)
    build_tiny_model(
        out_dir,
        out_dir,
        hidden_size=cfg.hidden,
        num_layers=cfg.layers,
        num_heads=cfg.heads,
        num_kv_heads=cfg.kv_heads,
        intermediate_size=cfg.intermediate,
        padded_vocab=cfg.padded_vocab,
        dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype)
    vocab = len(AutoTokenizer.from_pretrained(out_dir))
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight[vocab:] = 3 * weight[: cfg.padded_vocab - vocab]
    model.save_pretrained(out_dir)
    return out_dir


def prompts(model_dir: Path, n: int) -> list[list[int]]:
    """Chat prompts as the service renders them: the chat template, then token ids."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["question"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for r in synthetic_task_rows(n, seed=1)
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def timed(device: torch.device, fn: Callable[[], int]) -> tuple[int, float]:
    """(what ``fn`` returns, seconds), with the device drained on both sides."""
    sync(device)
    began = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - began


def run_generate(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], tokens: int, pad_id: int
) -> int:
    # min_new_tokens: every row generates the same count, as a random model's rows almost
    # surely do in the backend too (a stray eos is 1 in 32,000 per step).
    out = model.generate(
        **batch,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]


def check_outputs(outputs: list[TeacherOutput], k: int, vocab: int) -> None:
    """Each output's top-k is well formed: k real token ids, log-probs in (-inf, 0] whose
    mass is at most 1, a finite token log-prob."""
    for out in outputs:
        n = len(out.completion_ids)
        assert out.topk_ids.shape == (n, k), f"top-{k} ids of shape {out.topk_ids.shape}"
        assert out.topk_ids.size == 0 or 0 <= out.topk_ids.min() <= out.topk_ids.max() < vocab, (
            f"top-k ids outside the tokenizer's {vocab} tokens"
        )
        assert all(0 <= t < vocab for t in out.completion_ids), "a completion token is padding"
        lp = torch.as_tensor(out.topk_logprobs)
        assert torch.isfinite(lp).all() and (lp <= 0).all(), "top-k log-probs not in (-inf, 0]"
        # At most all of the mass on the top-k, float32 rounding aside.
        assert (lp.exp().sum(-1) <= 1.0 + 1e-3).all(), "top-k mass above 1"
        assert np.isfinite(out.token_logprob).all(), "non-finite token log-prob"


def run_backend(backend: TransformersBackend, requests: list[Query], k: int) -> int:
    outputs = asyncio.run(backend.generate(requests))
    check_outputs(outputs, k, backend.vocab_size)
    return sum(len(out.completion_ids) for out in outputs)


def check_generation(model_dir: Path, cfg: Config, device: torch.device, dtype: str) -> list[Row]:
    ids = prompts(model_dir, cfg.gen_batch)
    rows = []

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)
    with torch.inference_mode():
        run = partial(run_generate, model, batch, cfg.gen_tokens, tokenizer.eos_token_id)
        run()  # warm-up
        reset_peak(device)
        tokens, seconds = timed(device, run)
    rows.append(
        Row(
            "generate: model.generate (reference)",
            tokens / seconds,
            1e3 * seconds,
            peak_mib(device),
        )
    )
    del model, run
    reset_peak(device)

    backend = transformers_backend(model_dir, cfg, device, dtype, ids)
    try:
        sampling = Sampling(max_tokens=cfg.gen_tokens, temperature=0.0)
        # k=0 is the backend's own decoding loop without capture; k=max with it.
        for k in (0, cfg.max_k):
            requests = [Query("generate", tuple(p), k, sampling=sampling) for p in ids]
            run_backend(backend, requests, k)  # warm-up
            reset_peak(device)
            tokens, seconds = timed(device, partial(run_backend, backend, requests, k))
            label = f"top-{k} capture" if k else "no capture (k=0)"
            rows.append(
                Row(
                    f"generate: teacher backend, {label}",
                    tokens / seconds,
                    1e3 * seconds,
                    peak_mib(device),
                )
            )
    finally:
        asyncio.run(backend.close())
    return rows


def transformers_backend(
    model_dir: Path, cfg: Config, device: torch.device, dtype: str, ids: list[list[int]]
) -> TransformersBackend:
    # Room for every prompt in one backend batch, as model.generate gets them.
    batch_tokens = len(ids) * (max(map(len, ids)) + cfg.gen_tokens)
    return TransformersBackend(
        model_dir, device=str(device), dtype=dtype, max_k=cfg.max_k, max_batch_tokens=batch_tokens
    )


@dataclass
class Agreement:
    """How one vLLM run compares with the transformers backend on the same tokens."""

    positions: int
    top1: float  # share of positions with the same most likely token
    overlap: float  # mean share of the top-k ids both sides have
    mean_offset: float  # mean of vLLM minus transformers, token log-prob, nats
    max_offset: float  # largest absolute difference, nats

    def line(self, label: str) -> str:
        return (
            f"{label}: {self.positions} positions, top-1 same {100 * self.top1:.1f}%, "
            f"top-k overlap {100 * self.overlap:.1f}%, token log-prob offset mean "
            f"{self.mean_offset:+.4f} max {self.max_offset:.4f} nats"
        )


def agreement(ours: list[TeacherOutput], reference: list[TeacherOutput]) -> Agreement:
    top1, overlap, offsets = [], [], []
    for a, b in zip(ours, reference, strict=True):
        assert a.completion_ids == b.completion_ids, "the backends scored different tokens"
        top1 += (
            a.topk_ids[np.arange(len(a.topk_ids)), a.topk_logprobs.argmax(1)]
            == b.topk_ids[np.arange(len(b.topk_ids)), b.topk_logprobs.argmax(1)]
        ).tolist()
        overlap += [
            len(set(x.tolist()) & set(y.tolist())) / len(x)
            for x, y in zip(a.topk_ids, b.topk_ids, strict=True)
        ]
        offsets += (a.token_logprob - b.token_logprob).tolist()
    offsets = np.asarray(offsets)
    return Agreement(
        len(offsets),
        float(np.mean(top1)),
        float(np.mean(overlap)),
        float(offsets.mean()),
        float(np.abs(offsets).max()),
    )


def check_vllm(model_dir: Path, cfg: Config, device: torch.device, dtype: str) -> list[str]:
    """vLLM's generation and scoring against the transformers backend (see the module doc)."""
    from distillcache.services.teacher.backend_vllm import VllmBackend

    ids = prompts(model_dir, cfg.gen_batch)
    sampling = Sampling(max_tokens=cfg.gen_tokens, temperature=0.0)
    eager = device.type != "cuda"

    async def run_vllm() -> tuple[list[TeacherOutput], list[TeacherOutput], str]:
        # On CUDA as the service runs it: torch.compile and CUDA graphs, so the logit cut
        # made at the first request must hold in the captured model runner too. On CPU
        # eager, which starts in seconds.
        engine = VllmBackend(
            model_dir,
            max_k=cfg.max_k,
            dtype=dtype,
            enforce_eager=eager,
            max_model_len=1024,
            gpu_memory_utilization=0.5 if device.type == "cuda" else None,
        )
        try:
            generated = await engine.generate(
                [Query("generate", tuple(p), cfg.max_k, sampling=sampling) for p in ids]
            )
            scored = await engine.score(
                [
                    Query(
                        "score",
                        tuple(g.prompt_ids),
                        cfg.max_k,
                        completion_ids=tuple(g.completion_ids),
                    )
                    for g in generated
                ]
            )
            return generated, scored, engine.version
        finally:
            await engine.close()

    generated, scored, version = asyncio.run(run_vllm())
    check_outputs(generated + scored, cfg.max_k, len(AutoTokenizer.from_pretrained(model_dir)))
    for out in generated:
        # Greedy: the generated token is the most likely one, so vLLM's first entry (the
        # token) and the best of the rest (the top-k) must be the same log-prob.
        shifted = np.abs(out.token_logprob - out.topk_logprobs.max(1)).max(initial=0.0)
        assert shifted <= 1e-3, f"greedy token log-prob differs from the top-1 by {shifted}"

    reference = transformers_backend(model_dir, cfg, device, dtype, ids)
    try:
        expected = asyncio.run(
            reference.score(
                [
                    Query(
                        "score",
                        tuple(g.prompt_ids),
                        cfg.max_k,
                        completion_ids=tuple(g.completion_ids),
                    )
                    for g in generated
                ]
            )
        )
    finally:
        asyncio.run(reference.close())
    mode = "eager" if eager else "compiled, CUDA graphs"
    lines = [
        f"vLLM {version} ({dtype}, {mode}) against the transformers backend on the same tokens:"
    ]
    for label, ours in (("vLLM generate", generated), ("vLLM score", scored)):
        found = agreement(ours, expected)
        lines.append("  " + found.line(label))
        assert abs(found.mean_offset) <= MAX_MEAN_OFFSET, (
            f"{label}: mean log-prob offset {found.mean_offset:+.4f} nats against transformers "
            f"(limit {MAX_MEAN_OFFSET}): the backends normalize over different vocabularies"
        )
    return lines


def check_training(cfg: Config, device: torch.device) -> tuple[list[Row], str]:
    """bench/loss.py at the configured head: each variant's step in its own process."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-loss-") as tmp:
        report = Path(tmp) / "loss.json"
        command = [
            sys.executable,
            str(BENCH_LOSS),
            f"--vocab={cfg.head_vocab}",
            f"--hidden={cfg.head_hidden}",
            f"--batch={cfg.head_batch}",
            f"--seq={cfg.head_seq}",
            f"--k={cfg.max_k}",
            f"--steps={cfg.head_steps}",
            f"--device={device}",
            f"--json={report}",
        ]
        if device.type == "cuda":
            command.append("--bf16")
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0 and report.exists(), (
            f"bench/loss.py failed:\n{done.stderr[-2000:]}"
        )
        results = json.loads(report.read_text())["results"]
    failed = [r["variant"] for r in results if r.get("failed")]
    assert not failed, f"bench/loss.py: {', '.join(failed)} failed:\n{done.stderr[-2000:]}"
    tokens = cfg.head_batch * cfg.head_seq
    names = {
        "ce": "train step: cross-entropy (baseline)",
        "naive_kd": "train step: naive dense KD",
        "sparse_kd": "train step: sparse KD, chunked (trainer)",
    }
    by = {r["variant"]: r for r in results}
    rows = [
        Row(names[v], tokens / by[v]["step_s"], 1e3 * by[v]["step_s"], by[v]["peak_bytes"] / 2**20)
        for v in ("ce", "naive_kd", "sparse_kd")
    ]
    summary = (
        f"train step at vocab {cfg.head_vocab:,} x hidden {cfg.head_hidden}, "
        f"{cfg.head_batch} x {cfg.head_seq} tokens, k={cfg.max_k}: naive KD peak / sparse KD "
        f"peak = {by['naive_kd']['peak_bytes'] / by['sparse_kd']['peak_bytes']:.1f}x, sparse KD "
        f"time / CE time = {by['sparse_kd']['step_s'] / by['ce']['step_s']:.2f}x"
        + ("" if device.type == "cuda" else " (CPU memory: resident-set growth)")
    )
    return rows, summary


def print_table(rows: list[Row]) -> None:
    header = f"{'phase':<48} {'tokens/s':>10} {'ms':>9} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = "-" if r.peak_mib is None else f"{r.peak_mib:,.0f}"
        print(f"{r.phase:<48} {r.tokens_per_s:>10,.0f} {r.ms:>9,.1f} {peak:>9}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument(
        "--no-vllm",
        action="store_true",
        help="skip the vLLM comparison even where vLLM is installed",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available to this PyTorch; use --device cpu", file=sys.stderr)
        return 2
    cfg = GPU if device.type == "cuda" else CPU
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
        f"transformers {transformers.__version__}"
    )
    with_vllm = not args.no_vllm and importlib.util.find_spec("vllm") is not None
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        model_dir = build_model(cfg, Path(tmp), dtype)
        params = sum(
            p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters()
        )
        print(
            f"model: Qwen2, hidden {cfg.hidden}, {cfg.layers} layers, vocab {cfg.vocab:,} "
            f"(logits {cfg.padded_vocab:,}), {params / 1e6:.1f}M parameters, {dtype_name}; "
            f"generate {cfg.gen_batch} x {cfg.gen_tokens} tokens, k={cfg.max_k}"
        )
        rows = check_generation(model_dir, cfg, device, dtype_name)
        if with_vllm:
            vllm_lines = check_vllm(model_dir, cfg, device, dtype_name)
        else:
            reason = "--no-vllm" if args.no_vllm else "vLLM is not installed for this interpreter"
            vllm_lines = [f"vLLM comparison skipped: {reason}"]
    reset_peak(device)
    train_rows, train_summary = check_training(cfg, device)
    print()
    print_table(rows + train_rows)
    print(train_summary)
    print("\n".join(vllm_lines))
    print(f"\nok in {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
