"""Building blocks the trainer tests share: a tiny task, tiny models, real teacher shards.

No tests here. The shards are written by the real teacher service (in-process, the
transformers backend over a tiny model), so the trainer tests read exactly what
``distill serve`` and ``distill cache`` write.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from distillcache.services.teacher.backend import Query
from distillcache.services.teacher.metrics import ServiceMetrics
from distillcache.services.teacher.runtime import build_runtime, open_backend
from distillcache.services.teacher.settings import TeacherSettings
from distillcache.shared.inputs import parse_row, render_completion, render_prompt
from distillcache.shared.schema import Sampling
from distillcache.shared.tiny_models import (
    build_tiny_model,
    chat_texts,
    synthetic_task_rows,
    train_tiny_model,
    train_tokenizer,
)


def task_tokenizer(out_dir: Path, n_rows: int = 400) -> Path:
    """A tokenizer trained on the arithmetic task's text."""
    rows = synthetic_task_rows(n_rows, seed=123)
    train_tokenizer([f"{r['question']} {r['teacher_solution']}" for r in rows], 512, out_dir)
    return out_dir


def tiny_model(
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    padded_vocab: int | None = None,
) -> Path:
    return build_tiny_model(
        out_dir,
        tokenizer_dir,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // 32,
        intermediate_size=2 * hidden,
        seed=seed,
        padded_vocab=padded_vocab,
    )


def trained_teacher(out_dir: Path, tokenizer_dir: Path, rows: list[dict], steps: int) -> Path:
    """A teacher fitted to the task for ``steps`` AdamW steps (peaked, not random)."""
    tiny_model(out_dir, tokenizer_dir, hidden=128, layers=2, seed=7)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    train_tiny_model(out_dir, chat_texts(rows, tokenizer), steps=steps, lr=3e-3)
    return out_dir


def write_teacher_shards(
    teacher_dir: Path,
    rows: list[dict],
    out_dir: Path,
    *,
    k: int = 8,
    generate: bool = False,
    max_new_tokens: int = 24,
    row_group_tokens: int = 1024,
    score_prompt_from: int | None = None,
) -> Path:
    """Run the teacher service over seed rows into the dataset ``out_dir``, in-process.

    The shards are the real service's: the transformers backend under the runtime
    ``distill serve`` and ``distill cache`` build, ``TeacherService.answer`` keying and
    storing every row. ``generate``: the teacher writes the completions (greedy);
    otherwise it scores the rows' ``teacher_solution``. ``score_prompt_from`` also scores
    prompt tokens from that index on (``logprob_start``), as a scoring request may.
    """
    settings = TeacherSettings(
        model=str(teacher_dir),
        data_root=out_dir.parent,
        max_k=k,
        default_k=k,
        row_group_tokens=row_group_tokens,
    )
    sampling = Sampling(max_tokens=max_new_tokens)

    async def run() -> None:
        runtime = await build_runtime(settings, await open_backend(settings), ServiceMetrics())
        try:
            tokenizer = runtime.backend.tokenizer
            queries, metas = [], []
            for line, row in enumerate(rows, 1):
                item = parse_row("seed", line, row)
                prompt = tuple(render_prompt(tokenizer, item.messages))
                if generate:
                    query = Query("generate", prompt, k, sampling=sampling)
                else:
                    completion = tuple(render_completion(tokenizer, item.completion))
                    query = Query(
                        "score",
                        prompt,
                        k,
                        completion_ids=completion,
                        logprob_start=score_prompt_from,
                    )
                queries.append(query)
                metas.append(item.meta)
            runtime.store.open_dataset(out_dir.name, k, sampling)
            await runtime.service.answer(queries, dataset=out_dir.name, metas=metas, queue=False)
        finally:
            await runtime.close()

    asyncio.run(run())
    return out_dir


def model_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(model_dir) / "model.safetensors")


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[name] - wb[name]).abs().max().item() for name in wa)


def weights_differ(a: Path, b: Path) -> bool:
    return max_weight_difference(a, b) > 0
