"""Building blocks the trainer tests share: a tiny task, tiny models, real teacher shards.

No tests here. The shards are made the way the teacher service makes them, minus the
service: a real tiny model runs with plain torch (full-vocabulary log-softmax, top-k),
and ``ShardWriter`` writes the records.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillcache.shared.inputs import parse_row, render_completion, render_prompt
from distillcache.shared.keys import cache_key, tokenizer_hash
from distillcache.shared.record import SequenceRecord
from distillcache.shared.schema import DatasetInfo
from distillcache.shared.tiny_models import (
    build_tiny_model,
    chat_texts,
    synthetic_task_rows,
    train_tiny_model,
    train_tokenizer,
)
from distillcache.shared.writer import ShardWriter


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


@torch.no_grad()
def _greedy_completions(model, tokenizer, prompts: list[list[int]], max_new_tokens: int):
    eos = tokenizer.eos_token_id
    completions = []
    for start in range(0, len(prompts), 64):
        group = prompts[start : start + 64]
        width = max(map(len, group))
        ids = torch.full((len(group), width), eos)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, p in enumerate(group):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=eos,
            eos_token_id=eos,
        )[:, width:].tolist()
        for row in out:
            completions.append(row[: row.index(eos) + 1] if eos in row else row)
    return completions


@torch.no_grad()
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
    """Run the teacher over seed rows and write its top-k as a shard dataset.

    ``generate``: the teacher writes the completions (greedy); otherwise it scores the
    rows' ``teacher_solution``. ``score_prompt_from`` also scores prompt tokens from that
    index on (``logprob_start``), as a teacher-forcing job may.
    """
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    vocab = len(tokenizer)
    info = DatasetInfo(
        teacher_model=str(teacher_dir),
        tokenizer=str(teacher_dir),
        tokenizer_hash=tokenizer_hash(tokenizer),
        vocab_size=vocab,
        logit_width=model.config.vocab_size,
        k=k,
        backend="torch-test",
        backend_version=torch.__version__,
    )
    inputs = [parse_row("seed", i + 1, row) for i, row in enumerate(rows)]
    prompts = [render_prompt(tokenizer, item) for item in inputs]
    if generate:
        completions = _greedy_completions(model, tokenizer, prompts, max_new_tokens)
    else:
        completions = [render_completion(tokenizer, item) for item in inputs]
    with ShardWriter(out_dir, info, writer_id="test", row_group_tokens=row_group_tokens) as w:
        for item, prompt, completion in zip(inputs, prompts, completions, strict=True):
            if not completion:
                continue
            start = len(prompt) if score_prompt_from is None else score_prompt_from
            ids = torch.tensor([prompt + completion])
            logits = model(ids).logits[0, start - 1 : -1, :vocab]
            logprobs = F.log_softmax(logits.double(), -1).float()
            top = logprobs.topk(k, dim=-1)
            following = ids[0, start:]
            w.write(
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
                    logprob_start=start,
                    topk_ids=top.indices.numpy(),
                    topk_logprobs=top.values.numpy(),
                    token_logprob=logprobs.gather(1, following[:, None])[:, 0].numpy(),
                    completion_text=tokenizer.decode(completion),
                    meta=item.meta,
                )
            )
    return out_dir


def model_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(model_dir) / "model.safetensors")


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[name] - wb[name]).abs().max().item() for name in wa)


def weights_differ(a: Path, b: Path) -> bool:
    return max_weight_difference(a, b) > 0
