"""On-policy steps (GKD): the student samples, the live teacher scores, the union loss trains.

What this file decides, and why:

- Whether a step is on-policy, and which prompts it samples from, is a function of
  (seed, step) alone: a resumed run makes the same choices without any saved state.
- The student's sampling draws from its own RNG (generator states swapped in around
  ``generate``: the CPU one, and on CUDA the device's, where ``multinomial`` draws),
  saved in each checkpoint (``state_dict``): a stopped and resumed run samples the same
  tokens as a straight one, and the global torch RNG (dropout, data order) is not
  disturbed by how many tokens were sampled.
- Sampling enters through the training module's forward (``DistillStudent(generate=)``):
  under FSDP that is what gathers the root's embedding and head. Ranks sample different
  prompts, so under FSDP they generate in lockstep (``synced_gpus``): a rank whose
  samples all ended keeps joining the other ranks' forward passes (each one a collective)
  without drawing, so it draws exactly what it would alone.
- Sampling is transformers ``generate`` with its KV cache, in eval mode (no dropout), at
  the student's temperature / top-p; the student's own top-N ids at each position (its
  raw T=1 logits) go to the teacher as ``score_ids``, so reverse KL is exact where the
  student's mass lies (``sparse_kd.union_head_loss``).
- Every scored sample is stored by the teacher in one named dataset per run, each row's
  ``meta`` holding the step, the run's seed and the row: the run is auditable and
  replayable. The row also keeps the teacher's values at the sample's score_ids, so a
  step a resumed run repeats is answered from the cache: the teacher never scores a
  sample twice (docs/teacher-service.md, "score_ids").
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distillcache.shared.inputs import load_input_rows, render_prompt

from .batching import Batch, collate
from .config import TrainConfig
from .stream import Example, Source, iter_held_out
from .teacher_client import ScoreCall, TeacherClient

log = logging.getLogger(__name__)
# Distinct prompts read from --data at most (the dataset's own prompts).
MAX_DATA_PROMPTS = 100_000


@dataclass
class OnPolicyBatch(Batch):
    """A batch of the student's own samples: the teacher's top-k as in ``Batch``, plus
    per target position the ids the student asked about (``score_ids`` [N, s]) and the
    teacher's log-probs at them (``score_logprobs`` [N, s]; s is 0 when the teacher
    could not answer score_ids)."""

    score_ids: torch.Tensor | None = None
    score_logprobs: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> OnPolicyBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            if torch.is_tensor(getattr(self, f.name))
            # Non-tensor fields (keys) as they are.
            else getattr(self, f.name)
            for f in fields(self)
        }
        return OnPolicyBatch(**moved)


@dataclass
class StepCost:
    """What on-policy steps cost since the last log: teacher tokens, time per phase."""

    scored_tokens: int = 0
    cached_tokens: int = 0
    sample_s: float = 0.0
    score_s: float = 0.0

    def add(self, call: ScoreCall, sample_s: float, score_s: float) -> None:
        self.scored_tokens += call.scored_tokens
        self.cached_tokens += call.cached_tokens
        self.sample_s += sample_s
        self.score_s += score_s


def dataset_name(config: TrainConfig) -> str:
    """The run's dataset on the teacher: given, or from the output directory's name."""
    if config.on_policy_dataset is not None:
        return config.on_policy_dataset
    name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(config.output_dir).resolve().name)
    return f"onpolicy-{name}"


def load_prompts(
    config: TrainConfig, tokenizer: PreTrainedTokenizerBase, source: Source, units: list[Any]
) -> list[np.ndarray]:
    """Prompts in token ids: the prompt file's rows (rendered with the student's chat
    template, as ``distill cache`` renders them with the teacher's), or the distinct
    prompts of the training data; those leaving no room for a completion are dropped."""
    if config.prompts is not None:
        rows, errors = load_input_rows(config.prompts)
        if errors:
            first = errors[0]
            raise ValueError(f"{config.prompts}: {len(errors)} bad rows; first: {first}")
        prompts = [np.asarray(render_prompt(tokenizer, r.messages), np.int64) for r in rows]
        where = config.prompts
    else:
        seen: dict[bytes, np.ndarray] = {}
        for example in iter_held_out(source, units, rank=0, world=1):
            ids = np.asarray(example.prompt_ids, np.int64)
            seen.setdefault(ids.tobytes(), ids)
            if len(seen) >= MAX_DATA_PROMPTS:
                break
        prompts = list(seen.values())
        where = config.data
    room = config.max_length + 1 - config.sample_max_new_tokens
    kept = [p for p in prompts if 0 < len(p) <= room]
    if not kept:
        raise ValueError(
            f"{where}: no prompt of at most {room} tokens (max_length {config.max_length} "
            f"+ 1 - sample_max_new_tokens {config.sample_max_new_tokens}); raise max_length"
        )
    return kept


class OnPolicy:
    """Makes on-policy batches for one rank: sample, score, lay out."""

    def __init__(
        self,
        config: TrainConfig,
        tokenizer: PreTrainedTokenizerBase,
        prompts: list[np.ndarray],
        vocab_size: int,
        rank: int,
        client: TeacherClient | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.vocab_size = vocab_size
        self.rank = rank
        self.client = client or TeacherClient(config.teacher_url or "")
        self.dataset = dataset_name(config)
        self.sampler_seed = config.seed * 1_000_003 + rank
        self.rng_state = torch.Generator().manual_seed(self.sampler_seed).get_state()
        # The CUDA generator's state, from the first sample on a CUDA device on.
        self.cuda_rng_state: torch.Tensor | None = None
        self.cost = StepCost()

    def state_dict(self) -> dict[str, Any]:
        state = {"rng": self.rng_state.clone()}
        if self.cuda_rng_state is not None:
            state["cuda_rng"] = self.cuda_rng_state.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng_state = state["rng"].clone()
        cuda = state.get("cuda_rng")
        self.cuda_rng_state = None if cuda is None else cuda.clone()

    def is_on_policy(self, step: int) -> bool:
        """Step ``step`` (0-based) is on-policy with probability on_policy_fraction."""
        fraction = self.config.on_policy_fraction
        if fraction >= 1.0:
            return True
        return bool(np.random.default_rng([self.config.seed, step, 0]).random() < fraction)

    def draw(self, step: int, micro: int) -> list[int]:
        """Which prompts micro-batch ``micro`` of step ``step`` samples (indices into
        ``prompts``): from (seed, step, micro-batch, rank) alone."""
        rng = np.random.default_rng([self.config.seed, step, 1, micro, self.rank])
        return rng.choice(len(self.prompts), size=self.config.batch_size).tolist()

    def batch(
        self, student: torch.nn.Module, step: int, micro: int, lockstep: bool = False
    ) -> OnPolicyBatch:
        """Micro-batch ``micro`` of step ``step``: sampled, scored, stored, laid out.
        ``student`` is the training module (``DistillStudent``, or its FSDP root);
        ``lockstep``: ranks generate together (FSDP)."""
        prompts = [self.prompts[i] for i in self.draw(step, micro)]
        start = time.perf_counter()
        completions, student_top = self.sample(student, prompts, lockstep)
        sampled = time.perf_counter()
        pairs = []
        for row, (prompt, completion, top) in enumerate(
            zip(prompts, completions, student_top, strict=True)
        ):
            pair: dict[str, Any] = {
                "prompt_ids": prompt.tolist(),
                "completion_ids": completion.tolist(),
                "meta": {
                    "step": step,
                    "seed": self.config.seed,
                    "rank": self.rank,
                    "micro": micro,
                    "row": row,
                },
            }
            if self.config.score_top:
                pair["score_ids"] = top.tolist()
            pairs.append(pair)
        scored, call = self.client.score(pairs, k=self.config.teacher_k, dataset=self.dataset)
        self.cost.add(call, sampled - start, time.perf_counter() - sampled)
        examples = [
            Example(s.key, p, c, s.topk_ids, s.topk_logprobs, s.tail_logprob)
            for s, p, c in zip(scored, prompts, completions, strict=True)
        ]
        batch = collate([[e] for e in examples], self.tokenizer.pad_token_id, packed=False)
        with_scores = all(s.score_logprobs is not None for s in scored) and self.config.score_top
        if with_scores:
            score_ids = torch.from_numpy(np.concatenate(student_top)).long()
            score_lps = torch.from_numpy(np.concatenate([s.score_logprobs for s in scored]))
        else:
            score_ids = torch.zeros((batch.n_targets, 0), dtype=torch.long)
            score_lps = torch.zeros((batch.n_targets, 0), dtype=torch.float32)
        parts = {f.name: getattr(batch, f.name) for f in fields(batch)}
        return OnPolicyBatch(**parts, score_ids=score_ids, score_logprobs=score_lps.float())

    @torch.no_grad()
    def sample(
        self, student: torch.nn.Module, prompts: list[np.ndarray], lockstep: bool = False
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Completions of ``prompts`` (each ending at the first eos, which is kept) and the
        student's top-``score_top`` ids at each completion position."""
        config, device = self.config, next(student.parameters()).device
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding, as generation wants
            input_ids[row, width - len(prompt) :] = torch.from_numpy(prompt)
            mask[row, width - len(prompt) :] = 1
        generate = dict(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            temperature=config.sample_temperature,
            top_p=config.sample_top_p,
            top_k=0,
            max_new_tokens=config.sample_max_new_tokens,
            pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
            synced_gpus=lockstep,
        )
        cuda = device.type == "cuda"
        was_training = student.training
        student.eval()
        try:
            with torch.random.fork_rng(devices=[device] if cuda else []):
                torch.set_rng_state(self.rng_state)
                if cuda:
                    if self.cuda_rng_state is None:
                        seeded = torch.Generator(device).manual_seed(self.sampler_seed)
                        self.cuda_rng_state = seeded.get_state()
                    torch.cuda.set_rng_state(self.cuda_rng_state, device)
                out = student(generate=generate)
                self.rng_state = torch.get_rng_state()
                if cuda:
                    self.cuda_rng_state = torch.cuda.get_rng_state(device)
        finally:
            student.train(was_training)
        new = out.sequences[:, width:].cpu().numpy()
        logits = torch.stack(out.logits, dim=1)[..., : self.vocab_size].float().cpu()
        s = min(config.score_top, self.vocab_size)
        top = logits.topk(max(s, 1), dim=-1).indices.numpy()
        completions, tops = [], []
        eos = self.tokenizer.eos_token_id
        for row in range(len(prompts)):
            ends = np.flatnonzero(new[row] == eos)
            n = int(ends[0]) + 1 if len(ends) else new.shape[1]
            completions.append(new[row, :n].astype(np.int64))
            tops.append(top[row, :n, :s].astype(np.int64))
        return completions, tops
