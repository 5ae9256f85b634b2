"""On-policy steps across tokenizers: the student's samples, scored by the teacher as text.

``onpolicy.OnPolicy`` samples in the student's ids and asks the teacher about those ids;
a teacher of another tokenizer cannot read them. Here the student samples as there (same
prompts drawn from (seed, step), same sampler and saved RNG state), then:

- **What the teacher scores.** The text of each sample, in the teacher's own tokenization
  (``aligned_data.Retokenizer.to_teacher``): the longest valid UTF-8 prefix of the
  sampled bytes, encoded with the teacher's tokenizer, closed with the teacher's eos only
  when the student stopped there. The trainer encodes it and sends ``completion_ids``
  rather than the service's ``completion`` text field, because that field closes every
  text with eos (a sample cut at ``sample_max_new_tokens`` did not stop) and refuses a
  blank text (a student that stops at once is a sample the teacher must score), and
  because score_ids are asked per teacher position, known once the text is encoded. The
  tokenizer is the teacher's own: loaded as the off-policy path loads it (checked against
  the dataset's tokenizer hash), and checked against the hash in every answer's
  ``DatasetInfo``, so a served teacher of another tokenizer stops the run with one line.
  The prompt is the teacher's: ``prompt_ids`` from the dataset, or the prompt file's
  ``messages``, which the service renders with the teacher's chat template.
- **One tokenizer on both sides** (the vocabulary map is the identity): the sampled ids
  are the teacher's ids already and are sent as they are, exactly what a same-tokenizer
  on-policy step sends, so every chunk is 1:1.
- **score_ids.** Where a position is the same text on both sides (a 1:1 chunk), the
  student's own top-``score_top`` ids there that have a teacher token of identical bytes
  (``VocabMap.student_to_teacher``) are asked, in the teacher's ids, at that teacher
  position; no ids are asked elsewhere (the service takes a list per position). The
  chunk loss adds them to the matched outcomes with the teacher's exact log-probs and
  takes their mass out of the teacher's tail (``cross_tokenizer``), as
  ``union_head_loss`` does for one tokenizer. Without them an on-policy reverse KL on
  the teacher's top-k plus one bucket lets the student pile its mass on tokens the teacher
  never ranks (the bucket hides them): with SmolLM2's tokenizer on both sides, 60 steps
  took the sequence-level reverse KL to the teacher from 12.0 to 32.7 nats without
  score_ids and to 8.9 with them (bench/onpolicy_cross.py; docs/trainer.md has the
  figures, and those of a real pair, where the picture is less simple).
- **The batch** is an ``aligned_data.AlignedBatch`` laid out by ``Retokenizer.layout``,
  the same alignment as a cached row's, so ``DistillStudent`` trains it with the one
  cross-tokenizer loss (``cross_tokenizer.cross_head_loss``). A sample with no text the
  teacher can spell back (nothing but an unfinished character) is not sent; its
  positions, like any past the last complete chunk, get the hard-label term only.

Every sent sample is stored in the run's dataset with the same ``meta`` as a
same-tokenizer step's (step, seed, micro-batch, row), in the teacher's ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distillcache import preflight
from distillcache.shared.inputs import render_prompt
from distillcache.shared.keys import tokenizer_hash

from .aligned_data import (
    AlignedBatch,
    AlignedExample,
    AlignedShardSource,
    Retokenizer,
    RowAlignment,
    collate_aligned,
)
from .config import TrainConfig
from .onpolicy import OnPolicy, data_prompts
from .teacher_client import ScoreCall, TeacherClient


@dataclass
class CrossPrompt:
    """One prompt as each side reads it: the student's ids, and the teacher's fields of a
    score pair (``prompt_ids`` or ``messages``)."""

    student: np.ndarray
    teacher: dict[str, Any]


def load_cross_prompts(
    config: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    retokenizer: Retokenizer,
    source: AlignedShardSource,
    units: list[Any],
) -> list[CrossPrompt]:
    """The prompt file's rows (each side's own chat template: the student's rendered
    here, the teacher's by the service) or the distinct prompts of the training data (the
    teacher's ids, and their text encoded for the student as off-policy rows are); those
    leaving the student no room for a completion are dropped."""
    if config.prompts is not None:
        rows = preflight.prompt_file(config.prompts, "--prompts")
        prompts = [
            CrossPrompt(
                np.asarray(render_prompt(tokenizer, r.messages), np.int64),
                {"messages": r.messages},
            )
            for r in rows
        ]
        where = config.prompts
    else:
        prompts = [
            CrossPrompt(retokenizer.prompt(ids).astype(np.int64), {"prompt_ids": ids.tolist()})
            for ids in data_prompts(source.shards, units)
        ]
        where = config.data
    room = config.max_length + 1 - config.sample_max_new_tokens
    kept = [p for p in prompts if 0 < len(p.student) <= room]
    if not kept:
        raise ValueError(
            f"{where}: no prompt of at most {room} student tokens (max_length "
            f"{config.max_length} + 1 - sample_max_new_tokens {config.sample_max_new_tokens}); "
            "raise max_length"
        )
    return kept


@dataclass
class _Sample:
    """One sample before it is scored: both tokenizations and their chunks, the student's
    own ids to ask about per student position ([C, s], -1 none) and, per teacher position,
    the teacher ids asked for them."""

    alignment: RowAlignment
    student_score_ids: np.ndarray
    teacher_score_ids: list[list[int]]


class CrossOnPolicy(OnPolicy):
    """Makes on-policy batches for one rank of a student with another tokenizer."""

    def __init__(
        self,
        config: TrainConfig,
        tokenizer: PreTrainedTokenizerBase,
        prompts: list[CrossPrompt],
        vocab_size: int,
        rank: int,
        retokenizer: Retokenizer,
        client: TeacherClient | None = None,
    ) -> None:
        super().__init__(config, tokenizer, [p.student for p in prompts], vocab_size, rank, client)
        self.teacher_prompts = [p.teacher for p in prompts]
        self.retokenizer = retokenizer
        self.teacher_hash = tokenizer_hash(retokenizer.teacher)
        inverse = retokenizer.vocab_map.student_to_teacher()[:vocab_size]
        self.student_to_teacher = np.pad(
            inverse, (0, vocab_size - len(inverse)), constant_values=-1
        )
        table = retokenizer.vocab_map.teacher_to_student
        self.one_vocabulary = len(table) == vocab_size and bool(
            (table == np.arange(len(table))).all()
        )

    def batch(
        self, student: torch.nn.Module, step: int, micro: int, lockstep: bool = False
    ) -> AlignedBatch:
        """Micro-batch ``micro`` of step ``step``: sampled, scored as text, aligned
        (``student`` and ``lockstep`` as in ``OnPolicy.batch``)."""
        chosen = self.draw(step, micro)
        start = time.perf_counter()
        prompts = [self.prompts[i] for i in chosen]
        completions, tops = self.sample(student, prompts, self.sampler, lockstep)
        sampled = time.perf_counter()
        samples = [self._sample(c, top) for c, top in zip(completions, tops, strict=True)]
        pairs, sent = [], []
        for row, (index, sample) in enumerate(zip(chosen, samples, strict=True)):
            if len(sample.alignment.teacher_ids) == 0:
                continue
            meta = {
                "step": step,
                "seed": self.config.seed,
                "rank": self.rank,
                "micro": micro,
                "row": row,
            }
            pair = {
                **self.teacher_prompts[index],
                "completion_ids": sample.alignment.teacher_ids.tolist(),
                "meta": meta,
            }
            if self.config.score_top:
                pair["score_ids"] = sample.teacher_score_ids
            pairs.append(pair)
            sent.append(row)
        scored, call = [], ScoreCall()
        if pairs:
            scored, call = self.client.score(pairs, k=self.config.teacher_k, dataset=self.dataset)
            self._check(call)
        self.cost.add(call, sampled - start, time.perf_counter() - sampled)
        answers = dict(zip(sent, scored, strict=True))
        k = call.info.k if call.info is not None else 1
        with_scores = bool(self.config.score_top) and all(
            a.score_logprobs is not None for a in scored
        )
        examples = [
            self._example(self.prompts[index], sample, answers.get(row), k, with_scores)
            for row, (index, sample) in enumerate(zip(chosen, samples, strict=True))
        ]
        return collate_aligned(examples, self.tokenizer.pad_token_id)

    def _sample(self, completion: np.ndarray, top: np.ndarray) -> _Sample:
        """A sample's teacher ids, its alignment, and the score_ids to ask: at each 1:1
        chunk, the student's own top ids there that have a teacher id of identical bytes
        (asked in the teacher's ids; none at other positions)."""
        retok = self.retokenizer
        teacher_ids = completion if self.one_vocabulary else retok.to_teacher(completion)
        stops = len(teacher_ids) > 0 and int(teacher_ids[-1]) == retok.teacher_eos
        text_bytes = len(retok.teacher_bytes.text_bytes(teacher_ids[: len(teacher_ids) - stops]))
        alignment = retok.pair(teacher_ids, completion, text_bytes)
        student_ids = np.full(top.shape, -1, dtype=np.int64)
        asked: list[list[int]] = [[] for _ in teacher_ids]
        for i, i_end, j, j_end in alignment.chunks:
            if i_end - i == 1 and j_end - j == 1:
                kept = top[j][self.student_to_teacher[top[j]] >= 0]
                student_ids[j, : len(kept)] = kept
                asked[i] = self.student_to_teacher[kept].tolist()
        return _Sample(alignment, student_ids, asked)

    def _example(
        self, prompt: np.ndarray, sample: _Sample, answer, k: int, with_scores: bool
    ) -> AlignedExample:
        row, retok = sample.alignment, self.retokenizer
        s = sample.student_score_ids.shape[1] if with_scores else 0
        n_teacher = len(row.teacher_ids)
        scores = np.full((n_teacher, s), -np.inf, dtype=np.float32)
        if answer is None:  # nothing was scored: no chunk
            row = RowAlignment(row.teacher_ids, row.student_ids, row.chunks[:0], row.text_bytes)
            topk = np.zeros((n_teacher, k), dtype=np.int64)
            values = np.zeros(n_teacher, dtype=np.float32)
            return retok.layout(
                "",
                prompt,
                row,
                topk,
                topk.astype(np.float32),
                values,
                values,
                sample.student_score_ids[:, :s],
                scores,
            )
        if s:
            width = min(s, answer.score_logprobs.shape[1])
            scores[:, :width] = answer.score_logprobs[:, :width]
        return retok.layout(
            answer.key,
            prompt,
            row,
            answer.topk_ids,
            answer.topk_logprobs,
            answer.tail_logprob,
            answer.token_logprob,
            sample.student_score_ids[:, :s],
            scores,
        )

    def _check(self, call: ScoreCall) -> None:
        """The answering teacher tokenizes as this run's teacher tokenizer, with a full k."""
        info, url = call.info, self.client.url
        if info.tokenizer_hash != self.teacher_hash:
            raise ValueError(
                f"the teacher at {url} uses the tokenizer {info.tokenizer} (hash "
                f"{info.tokenizer_hash[:12]}), not the one this run aligns with (hash "
                f"{self.teacher_hash[:12]}): serve the teacher that made --data, or give its "
                "tokenizer with --teacher-tokenizer"
            )
        if info.adaptive is not None:
            raise ValueError(
                f"the teacher at {url} answers with adaptive k ({info.adaptive}); cross-tokenizer "
                "on-policy steps need a fixed k: serve it without adaptive_mass/adaptive_min_prob"
            )


def open_cross_onpolicy(
    config: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    data,
    vocab_size: int,
    rank: int,
    client: TeacherClient | None = None,
) -> CrossOnPolicy:
    """The on-policy step maker of a cross-tokenizer run (``data`` from
    ``aligned_data.open_aligned_data``: its source holds the run's ``Retokenizer``)."""
    retokenizer = data.source.retokenizer
    prompts = load_cross_prompts(config, tokenizer, retokenizer, data.source, data.train_units)
    return CrossOnPolicy(config, tokenizer, prompts, vocab_size, rank, retokenizer, client)
