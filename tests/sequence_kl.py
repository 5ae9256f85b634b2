"""The sequence-level reverse KL between two causal LMs of any tokenizers, in float64.

On-policy distillation drives down KL(student || teacher) over whole completions. Its
Monte-Carlo estimate needs nothing but the two models: draw y from the student, score
y's text under each model in its own tokenization, average log p_S(y) - log p_T(y). No
service, no alignment code, no top-k: a reference independent of what it checks (the
on-policy tests across tokenizers, bench/onpolicy_cross.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillcache.shared.inputs import render_prompt, user_turn


def sequence_reverse_kl(student_dir: Path, teacher_dir: Path, questions: list[str]) -> float:
    """Mean over prompts of log p_S(y) - log p_T(y), y the student's own seeded sample of
    at most 16 tokens: a Monte-Carlo estimate of the sequence-level reverse KL(student ||
    teacher), what on-policy distillation drives down. Each side scores the text in its
    own tokenization (the teacher: the decoded text encoded again, plus its eos when the
    student stopped), float64 log-softmax over the full vocabulary; no service, no
    alignment code."""
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    s_tok = AutoTokenizer.from_pretrained(student_dir)
    t_tok = AutoTokenizer.from_pretrained(teacher_dir)

    def log_prob(model, vocab: int, prompt: list[int], ids: list[int]) -> float:
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1, :vocab]
        lp = torch.log_softmax(logits.double(), -1)
        return float(lp.gather(1, torch.tensor(ids).unsqueeze(1)).sum())

    gaps = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1234)
        for question in questions:
            prompt = render_prompt(s_tok, user_turn(question))
            out = student.generate(
                torch.tensor([prompt]),
                do_sample=True,
                top_k=0,
                max_new_tokens=16,
                pad_token_id=s_tok.eos_token_id,
                eos_token_id=s_tok.eos_token_id,
            )[0, len(prompt) :].tolist()
            stopped = s_tok.eos_token_id in out
            sample = out[: out.index(s_tok.eos_token_id) + 1] if stopped else out
            body = sample[:-1] if stopped else sample
            text = s_tok.decode(body, clean_up_tokenization_spaces=False)
            t_ids = t_tok.encode(text, add_special_tokens=False)
            t_ids += [t_tok.eos_token_id] if stopped else []
            t_prompt = render_prompt(t_tok, user_turn(question))
            gaps.append(
                log_prob(student, len(s_tok), prompt, sample)
                - log_prob(teacher, len(t_tok), t_prompt, t_ids)
            )
    return float(np.mean(gaps))
