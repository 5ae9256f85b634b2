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
- A run without ``data`` (on-policy only, a prompt file) has no held-out rows, so it
  holds out prompts and evaluates on the student's own samples of them, scored and
  stored like training's (``meta.eval_step``). They draw from a generator of their own,
  seeded alike at every evaluation: evaluations differ only by the model, and the
  training sampler's state, hence resume, is untouched.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distillcache import preflight
from distillcache.shared.inputs import render_prompt

from .batching import Batch, collate
from .config import TrainConfig
from .seq_kd import is_seed_file
from .stream import Example, Source, iter_held_out, split_held_out
from .teacher_client import ScoreCall, TeacherClient

log = logging.getLogger(__name__)
# Distinct prompts read from --data at most (the dataset's own prompts).
MAX_DATA_PROMPTS = 100_000
# Added to a rank's sampler seed for held-out sampling: a stream apart from training's.
EVAL_STREAM = 7_919


@dataclass
class SamplerRng:
    """What a sampler draws from: a torch CPU generator state and, once it sampled on a
    CUDA device (where ``multinomial`` draws), that device's generator state, seeded
    from ``seed`` at the first sample there."""

    seed: int
    cpu: torch.Tensor
    cuda: torch.Tensor | None = None

    @classmethod
    def seeded(cls, seed: int) -> SamplerRng:
        return cls(seed, torch.Generator().manual_seed(seed).get_state())


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
    config: TrainConfig, tokenizer: PreTrainedTokenizerBase, source: Source | None, units: list[Any]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training prompts, held-out prompts) in token ids.

    Training prompts: the prompt file's rows (rendered with the student's chat template,
    as ``distill cache`` renders them with the teacher's), or the distinct prompts of the
    training data. Held-out prompts only in a run without ``data`` (with data, the
    held-out rows of the dataset are evaluated): ``eval_data`` when it is a prompt file,
    else ``eval_fraction`` of the prompts, whole prompts chosen by content hash as
    ``split_held_out`` chooses row groups. Prompts leaving no room for a completion are
    dropped.
    """
    if config.prompts is not None:
        prompts = _rendered(config.prompts, "--prompts", tokenizer)
        where = config.prompts
    else:
        prompts = data_prompts(source, units)
        where = config.data
    held: list[np.ndarray] = []
    if config.data is None and config.eval_data is not None:
        if is_seed_file(config.eval_data):  # a dataset there is evaluated as in any run
            rendered = _rendered(config.eval_data, "--eval-data", tokenizer)
            held = _fitting(rendered, config, config.eval_data)
    elif config.data is None and config.eval_fraction > 0:
        prompts, held = split_held_out(prompts, config.eval_fraction, lambda p: p.tobytes().hex())
        held = _fitting(held, config, where)
    return _fitting(prompts, config, where), held


def data_prompts(source: Source, units: list[Any]) -> list[np.ndarray]:
    """The distinct prompts (ids) of the training data, at most ``MAX_DATA_PROMPTS``."""
    seen: dict[bytes, np.ndarray] = {}
    for example in iter_held_out(source, units, rank=0, world=1):
        ids = np.asarray(example.prompt_ids, np.int64)
        seen.setdefault(ids.tobytes(), ids)
        if len(seen) >= MAX_DATA_PROMPTS:
            break
    return list(seen.values())


def _rendered(path: str, flag: str, tokenizer: PreTrainedTokenizerBase) -> list[np.ndarray]:
    rows = preflight.prompt_file(path, flag)
    return [np.asarray(render_prompt(tokenizer, r.messages), np.int64) for r in rows]


def _fitting(prompts: list[np.ndarray], config: TrainConfig, where: str) -> list[np.ndarray]:
    """The prompts that leave room for a completion of sample_max_new_tokens."""
    room = config.max_length + 1 - config.sample_max_new_tokens
    kept = [p for p in prompts if 0 < len(p) <= room]
    if not kept:
        raise ValueError(
            f"{where}: no prompt of at most {room} tokens (max_length {config.max_length} "
            f"+ 1 - sample_max_new_tokens {config.sample_max_new_tokens}); raise max_length"
        )
    return kept


class OnPolicy:
    """Makes on-policy batches for one rank: sample, score, lay out; and, in a run without
    ``data``, the held-out batches (``eval_batches``)."""

    def __init__(
        self,
        config: TrainConfig,
        tokenizer: PreTrainedTokenizerBase,
        prompts: list[np.ndarray],
        vocab_size: int,
        rank: int,
        client: TeacherClient | None = None,
        held_out: list[np.ndarray] | None = None,
        world: int = 1,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.held_out = held_out or []
        self.vocab_size = vocab_size
        self.rank = rank
        self.world = world
        self.client = client or TeacherClient(config.teacher_url or "")
        self.dataset = dataset_name(config)
        self.sampler = SamplerRng.seeded(config.seed * 1_000_003 + rank)
        self.cost = StepCost()

    def state_dict(self) -> dict[str, Any]:
        state = {"rng": self.sampler.cpu.clone()}
        if self.sampler.cuda is not None:
            state["cuda_rng"] = self.sampler.cuda.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cuda = state.get("cuda_rng")
        self.sampler = SamplerRng(
            self.sampler.seed, state["rng"].clone(), None if cuda is None else cuda.clone()
        )

    def is_on_policy(self, step: int) -> bool:
        """Step ``step`` (0-based) is on-policy with probability on_policy_fraction, once
        the on_policy_warmup_steps are past."""
        if step < self.config.on_policy_warmup_steps:
            return False
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
        completions, student_top = self.sample(student, prompts, self.sampler, lockstep)
        sampled = time.perf_counter()
        meta = {"step": step, "seed": self.config.seed, "rank": self.rank, "micro": micro}
        batch, call = self._scored(prompts, completions, student_top, [meta] * len(prompts))
        self.cost.add(call, sampled - start, time.perf_counter() - sampled)
        return batch

    def eval_batches(
        self, student: torch.nn.Module, step: int, lockstep: bool = False
    ) -> Iterator[OnPolicyBatch]:
        """This rank's share of the held-out prompts, sampled by the student as it is at
        ``step`` and scored by the teacher (``student`` and ``lockstep`` as in ``batch``).
        Every evaluation samples with the same seed (``EVAL_STREAM``) and leaves the
        training sampler's state alone, so evaluations differ only by the model and a
        resumed run evaluates as a straight one. Every rank gets as many prompts (the
        last ``len % world`` are left out), so under FSDP they sample in lockstep."""
        rng = SamplerRng.seeded(self.config.seed * 1_000_003 + self.rank + EVAL_STREAM)
        usable = len(self.held_out) - len(self.held_out) % self.world
        mine = self.held_out[:usable][self.rank :: self.world]
        size = self.config.batch_size
        for start in range(0, len(mine), size):
            prompts = mine[start : start + size]
            completions, student_top = self.sample(student, prompts, rng, lockstep)
            meta = {"eval_step": step, "seed": self.config.seed, "first": start, "rank": self.rank}
            batch, _ = self._scored(prompts, completions, student_top, [meta] * len(prompts))
            yield batch

    def _scored(
        self,
        prompts: list[np.ndarray],
        completions: list[np.ndarray],
        student_top: list[np.ndarray],
        metas: list[dict[str, Any]],
    ) -> tuple[OnPolicyBatch, ScoreCall]:
        """The samples scored by the teacher (and stored in the run's dataset, each row's
        meta with its row number added), laid out as a batch."""
        pairs = []
        for row, (prompt, completion, top, meta) in enumerate(
            zip(prompts, completions, student_top, metas, strict=True)
        ):
            pair: dict[str, Any] = {
                "prompt_ids": prompt.tolist(),
                "completion_ids": completion.tolist(),
                "meta": {**meta, "row": row},
            }
            if self.config.score_top:
                pair["score_ids"] = top.tolist()
            pairs.append(pair)
        scored, call = self.client.score(pairs, k=self.config.teacher_k, dataset=self.dataset)
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
        on_policy = OnPolicyBatch(**parts, score_ids=score_ids, score_logprobs=score_lps.float())
        return on_policy, call

    @torch.no_grad()
    def sample(
        self,
        student: torch.nn.Module,
        prompts: list[np.ndarray],
        rng: SamplerRng,
        lockstep: bool = False,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Completions of ``prompts`` (each ending at the first eos, which is kept) and the
        student's top-``score_top`` ids at each completion position, drawn from ``rng``
        (which then holds the states after them)."""
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
                torch.set_rng_state(rng.cpu)
                if cuda:
                    if rng.cuda is None:
                        rng.cuda = torch.Generator(device).manual_seed(rng.seed).get_state()
                    torch.cuda.set_rng_state(rng.cuda, device)
                out = student(generate=generate)
                rng.cpu = torch.get_rng_state()
                if cuda:
                    rng.cuda = torch.cuda.get_rng_state(device)
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
