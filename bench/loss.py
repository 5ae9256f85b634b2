"""Peak memory and time per step: chunked sparse KD vs naive dense KD vs plain CE.

One training step of the output head and its loss, from final hidden states [B*T, H]
through the head's weight [V, H] to gradients for both: everything KD changes. Three
variants, each in a fresh subprocess so that one's allocations cannot hide another's:

- ``ce``: plain cross-entropy training, ``F.cross_entropy(h @ W.T, labels)``, as a
  Hugging Face model computes it: the full [B*T, V] logits exist.
- ``naive_kd``: naive dense KD: full logits, full log-softmax, and the teacher's top-k
  probabilities scattered into a dense [B*T, V] tensor, ``F.kl_div``.
- ``sparse_kd``: this trainer's ``chunked_head_loss`` (forward KL, tail bucket).

Memory: on CPU, the worker's own peak resident set size (``VmHWM``) minus its resident
size just before the first step, i.e. what the step adds on top of the inputs (hidden
states, weight, teacher top-k); tracemalloc cannot see torch's allocations. On CUDA,
``torch.cuda.max_memory_allocated`` above the allocation before the step. The weight's
gradient (V x H float32) is part of every variant's step.

Example (the issue's setting, Qwen2.5-0.5B's head):

    python bench/loss.py --vocab 151936 --hidden 896 --batch 4 --seq 1024 --k 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from process_memory import peak_rss_bytes, rss_bytes

VARIANTS = ("ce", "naive_kd", "sparse_kd")


def _step(variant: str, h, w, labels, topk_ids, topk_logprobs, tail, args) -> None:
    n = h.shape[0]
    if variant == "ce":
        loss = F.cross_entropy((h @ w.T).float(), labels)
    elif variant == "naive_kd":
        log_p = F.log_softmax((h @ w.T).float(), dim=-1)
        dense = torch.zeros_like(log_p).scatter_(1, topk_ids, topk_logprobs.exp())
        loss = F.kl_div(log_p, dense, reduction="sum") / n
    else:
        from distillcache.trainer.sparse_kd import LossSpec, chunked_head_loss

        spec = LossSpec(vocab_size=w.shape[0], tail=args.tail, chunk_size=args.chunk_size)
        total, _ = chunked_head_loss(h, w, labels, topk_ids, topk_logprobs, tail, spec)
        loss = total / n
    loss.backward()


def worker(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    n = args.batch * args.seq
    dtype = torch.float32
    h = (torch.randn(n, args.hidden, device=device, dtype=dtype)).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, device=device, dtype=dtype) * 0.02).requires_grad_()
    labels = torch.randint(args.vocab, (n,), device=device)
    topk_ids = torch.stack(
        [torch.randperm(args.vocab, device=device)[: args.k] for _ in range(64)]
    ).repeat(n // 64 + 1, 1)[:n]
    topk_ids = topk_ids.sort(dim=-1).values
    raw = torch.randn(n, args.k + 1, device=device) * 2
    logprobs = F.log_softmax(raw, dim=-1)
    topk_logprobs, tail = logprobs[:, : args.k].contiguous(), logprobs[:, -1].contiguous()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and args.bf16
        else torch.autocast("cpu", enabled=False)
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
    times = []
    for _ in range(args.warmup + args.steps):
        h.grad = w.grad = None
        start = time.perf_counter()
        with autocast:
            _step(args.variant, h, w, labels, topk_ids, topk_logprobs, tail, args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = peak_rss_bytes() - before
    measured = times[args.warmup :]
    return {
        "variant": args.variant,
        "device": str(device),
        "peak_bytes": peak,
        "step_s": statistics.median(measured),
        "steps_s": measured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--tail", choices=("bucket", "renormalize"), default="bucket")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or both")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(worker(args)))
        return

    devices = ["cpu", "cuda"] if args.device == "both" else [args.device]
    results = []
    for device in devices:
        for variant in VARIANTS:
            argv = [a for a in sys.argv[1:] if not a.startswith("--device")]
            if "--device" in sys.argv:
                i = sys.argv.index("--device")
                argv = sys.argv[1:i] + sys.argv[i + 2 :]
            command = [sys.executable, __file__, *argv, "--device", device, "--variant", variant]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{device} {variant}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                results.append({"variant": variant, "device": device, "failed": True})
                continue
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(
        f"V={args.vocab} H={args.hidden} B x T={args.batch} x {args.seq} k={args.k} "
        f"chunk={args.chunk_size} tail={args.tail} steps={args.steps} "
        f"threads={torch.get_num_threads() if not args.threads else args.threads}"
    )
    print(f"{'device':<6} {'variant':<10} {'peak MiB':>10} {'step s':>9}")
    for r in results:
        if r.get("failed"):
            print(f"{r['device']:<6} {r['variant']:<10} {'failed':>10}")
            continue
        print(
            f"{r['device']:<6} {r['variant']:<10} {r['peak_bytes'] / 2**20:>10.0f} {r['step_s']:>9.3f}"
        )
    for device in devices:
        by = {r["variant"]: r for r in results if r["device"] == device and not r.get("failed")}
        if len(by) < 3:
            continue
        memory = by["naive_kd"]["peak_bytes"] / by["sparse_kd"]["peak_bytes"]
        speed = by["sparse_kd"]["step_s"] / by["ce"]["step_s"]
        print(
            f"{device}: naive KD peak / sparse KD peak = {memory:.1f}x (target >= 5x); "
            f"sparse KD time / CE time = {speed:.2f}x (target <= 1.2x); "
            f"naive KD time / CE time = {by['naive_kd']['step_s'] / by['ce']['step_s']:.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
