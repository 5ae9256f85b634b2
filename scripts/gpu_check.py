"""GPU check: the transformers teacher backend and sparse-KD training steps on one device.

For a machine with CUDA and PyTorch but no network (no model hub): it builds a local
Qwen2-style model (hidden 512, 8 layers, a 32,000-token BPE tokenizer padded to 32,768
logit rows, as Qwen pads its head), then measures

- generation: tokens/s of the teacher backend's own decoding loop without capture
  (k=0) and with top-k capture (k=64), with plain ``model.generate`` as a reference, on
  the same greedy prompts in one batch;
- training: a few optimizer steps through the trainer's ``DistillStudent`` (chunked
  head, forward KL on the top-k plus tail bucket, bf16 autocast) against the same steps
  with a dense KD loss (full-vocabulary log-softmax), each with its step time and
  ``torch.cuda.max_memory_allocated``.

It prints one compact table and exits non-zero when a loss is not finite or a captured
distribution is malformed. Sized to finish well within the 5 minutes scripts/gpu_check.sh
allows on one GPU; ``--device cpu`` runs a much smaller configuration as a smoke test.

    python scripts/gpu_check.py                 # cuda
    python scripts/gpu_check.py --device cpu    # quick local smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
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
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillcache.services.teacher.backend import GenerateRequest, Sampling
from distillcache.services.teacher.backend_transformers import TransformersBackend
from distillcache.shared.tiny_models import build_tiny_model, synthetic_task_rows, train_tokenizer
from distillcache.trainer.batching import Batch, collate
from distillcache.trainer.config import TrainConfig
from distillcache.trainer.loop import build_optimizer
from distillcache.trainer.sparse_kd import LossSpec
from distillcache.trainer.stream import Example
from distillcache.trainer.student import DistillStudent, load_student


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
    train_batch: int
    train_seq: int
    max_k: int
    warmup: int
    steps: int


GPU = Config(512, 8, 8, 2, 1536, 32_000, 32_768, 32, 128, 8, 1024, 64, 2, 5)
CPU = Config(128, 2, 2, 2, 256, 4_000, 4_096, 8, 32, 2, 128, 64, 1, 3)


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
    rows = list(synthetic_task_rows(200))
    texts = [f"{r['question']} {r['teacher_solution']}" for r in rows]
    train_tokenizer(texts + synthetic_corpus(20_000), cfg.vocab, out_dir)
    return build_tiny_model(
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


def run_backend(backend: TransformersBackend, requests: list[GenerateRequest], k: int) -> int:
    outputs = asyncio.run(backend.generate(requests))
    for out in outputs:
        n = len(out.completion_ids)
        assert out.topk_ids.shape == (n, k), f"top-{k} ids of shape {out.topk_ids.shape}"
        lp = torch.as_tensor(out.topk_logprobs)
        assert torch.isfinite(lp).all() and (lp <= 0).all(), "top-k log-probs not in (-inf, 0]"
        # At most all of the mass on the top-k, float32 rounding aside.
        assert (lp.exp().sum(-1) <= 1.0 + 1e-3).all(), "top-k mass above 1"
        assert np.isfinite(out.token_logprob).all(), "non-finite token log-prob"
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

    # Room for every prompt in one backend batch, as model.generate gets them.
    batch_tokens = len(ids) * (max(map(len, ids)) + cfg.gen_tokens)
    backend = TransformersBackend(
        model_dir, device=str(device), dtype=dtype, max_k=cfg.max_k, max_batch_tokens=batch_tokens
    )
    try:
        sampling = Sampling(max_tokens=cfg.gen_tokens, temperature=0.0)
        # k=0 is the backend's own decoding loop without capture; k=max with it.
        for k in (0, cfg.max_k):
            requests = [GenerateRequest(tuple(p), k, sampling) for p in ids]
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


def dense_kd_loss(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    vocab: int,
) -> torch.Tensor:
    """Naive KD, for reference: the same forward KL on the top-k plus tail bucket, from the
    student's full-vocabulary log-softmax, so [positions, vocab] float32 tensors exist."""
    student = F.log_softmax(logits[..., :vocab].float(), dim=-1).gather(-1, topk_ids)
    student_tail = torch.log1p(-student.logsumexp(-1).exp().clamp(max=1 - 1e-6))
    student = torch.cat([student, student_tail.unsqueeze(-1)], dim=-1)
    teacher = torch.cat([topk_logprobs, tail_logprob.unsqueeze(-1)], dim=-1)
    return (teacher.exp() * (teacher - student)).sum()


def synthetic_batch(cfg: Config, seed: int = 0) -> Batch:
    """A training batch in the trainer's layout (``collate``): each row one example of a
    short prompt and a completion filling ``train_seq``, with a peaked teacher top-k
    (distinct random ids, their log-probs, the tail mass) at every completion position."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(cfg.train_batch):
        prompt = rng.integers(cfg.vocab, size=32)
        completion = rng.integers(cfg.vocab, size=cfg.train_seq - 32 + 1)
        n = len(completion)
        topk_ids = np.stack([rng.choice(cfg.vocab, cfg.max_k, replace=False) for _ in range(n)])
        logits = np.concatenate([3.0 * rng.standard_normal((n, cfg.max_k)), np.zeros((n, 1))], 1)
        logprobs = torch.log_softmax(torch.from_numpy(logits), dim=-1).float().numpy()
        examples.append(
            Example("synthetic", prompt, completion, topk_ids, logprobs[:, :-1], logprobs[:, -1])
        )
    return collate([[e] for e in examples], pad_id=0, packed=False)


def sparse_loss(student: DistillStudent, batch: Batch) -> torch.Tensor:
    """The trainer's own loss: DistillStudent runs the chunked head, summed over targets."""
    loss, _ = student(batch)
    return loss / batch.n_targets


def dense_loss(student: DistillStudent, batch: Batch) -> torch.Tensor:
    logits = student.model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits
    kd = dense_kd_loss(
        logits[batch.target_rows, batch.target_cols],
        batch.topk_ids,
        batch.topk_logprobs,
        batch.tail_logprob,
        student.spec.vocab_size,
    )
    return kd / batch.n_targets


def optimizer_step(student, optimizer, loss_fn, batch, autocast) -> int:
    with autocast():
        loss = loss_fn(student, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert math.isfinite(loss.item()), f"loss is {loss.item()}"
    return batch.n_targets


def check_training(model_dir: Path, cfg: Config, device: torch.device) -> list[Row]:
    batch = synthetic_batch(cfg).to(device)
    spec = LossSpec(vocab_size=cfg.vocab, loss="forward_kl", tail="bucket")
    config = TrainConfig(data="-", student=str(model_dir), output_dir="-", lr=1e-4)

    # As the trainer runs: float32 master weights, bfloat16 autocast on CUDA.
    def autocast():
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    rows = []
    for name, loss_fn in (
        ("train: sparse KD, chunked head (trainer)", sparse_loss),
        ("train: dense KD, full log-softmax (reference)", dense_loss),
    ):
        student = DistillStudent(load_student(str(model_dir), cfg.vocab), spec).to(device)
        student.train()
        optimizer = build_optimizer(student.model, config)
        run = partial(optimizer_step, student, optimizer, loss_fn, batch, autocast)
        for _ in range(cfg.warmup):
            run()
        reset_peak(device)
        seconds = sum(timed(device, run)[1] for _ in range(cfg.steps)) / cfg.steps
        rows.append(Row(name, batch.n_targets / seconds, 1e3 * seconds, peak_mib(device)))
        del student, optimizer, run
        reset_peak(device)
    return rows


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
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available to this PyTorch; use --device cpu", file=sys.stderr)
        return 2
    cfg = GPU if device.type == "cuda" else CPU
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
        f"transformers {transformers.__version__}"
    )
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        model_dir = build_model(cfg, Path(tmp), dtype)
        params = sum(
            p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters()
        )
        print(
            f"model: Qwen2, hidden {cfg.hidden}, {cfg.layers} layers, vocab {cfg.vocab:,} "
            f"(logits {cfg.padded_vocab:,}), {params / 1e6:.1f}M parameters, {dtype}; "
            f"generate {cfg.gen_batch} x {cfg.gen_tokens} tokens; train {cfg.train_batch} x "
            f"{cfg.train_seq} tokens, k={cfg.max_k}, {cfg.steps} steps"
        )
        rows = check_generation(model_dir, cfg, device, str(dtype).removeprefix("torch."))
        rows += check_training(model_dir, cfg, device)
    print()
    print_table(rows)
    print(f"\nok in {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
