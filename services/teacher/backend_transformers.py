"""The reference teacher: plain PyTorch forward passes through a Hugging Face causal LM.

Every log-prob is the exact log-softmax (computed in float64, stored as float32) over the
tokenizer's whole vocabulary
(the model's logits sliced to ``len(tokenizer)``: Qwen pads the logit width past the
tokenizer, and the padding columns are not tokens). This is what the vLLM backend is
checked against, and what runs on machines without vLLM, GPU or CPU.

Batching never changes what a request gets, up to float rounding: scoring right-pads
with an attention mask, generation left-pads with explicit position ids (so RoPE sees
the same positions as an unpadded run), and each sampled request draws from its own
``torch.Generator`` seeded from its ``Sampling.seed``. Matrix products over a different
batch shape may round differently in the last bits; that is the only difference.

A sampled query (``Query.sampled``, RS-KD) gets, at each scored position, N draws with
replacement from ``softmax(logits / T)`` over the whole vocabulary, from a generator of
its own seeded with ``Query.draw_seed`` (from its cache key): positions in order, all N of
a position at once (``torch.multinomial``). Recomputing the row (same logits) redraws the
same tokens. The draws are kept as distinct ids with ``ln(count / N)`` (``_distinct``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from distillcache.shared.schema import SampledLogits, Sampling

from .backend import Query, TeacherOutput, stop_token_ids
from .cpu_attention import CPU_GQA_ATTENTION
from .identity import model_revision
from .limits import Limits

# Positions whose float64 log-softmax is held at once: 1024 x 152k x 8 bytes = 1.2 GB.
_LOGSOFTMAX_ROWS = 1024


@dataclass
class _Capture:
    """Per-position top-k and actual-token log-probs of one request, grown step by step."""

    topk_ids: list[torch.Tensor]
    topk_logprobs: list[torch.Tensor]
    token_logprobs: list[torch.Tensor]


class TransformersBackend:
    """A Hugging Face causal LM held in memory; one forward pass runs at a time."""

    name = "transformers"
    score_ids = True  # full logits are at hand: any id's log-prob is exact

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        max_k: int = 64,
        max_model_len: int | None = None,
        revision: str | None = None,
        max_batch_tokens: int = 4096,
    ) -> None:
        """`dtype` names a torch dtype ("float32", "bfloat16"); log-probs are float32 either
        way. `max_batch_tokens` bounds rows x padded length per forward pass, and with it
        the logits a scoring batch holds: up to that many x logit width floats (4096 x
        152,064 x 4 bytes = 2.5 GB for Qwen). `revision` picks a hub commit, branch or tag;
        ``self.revision`` is the commit hash it resolved to, or for a plain local directory
        a hash of its config and weight-file names and sizes (see `model_revision`)."""
        self.model_id = str(model)
        self.version = transformers.__version__
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        self.model = AutoModelForCausalLM.from_pretrained(
            model,
            revision=revision,
            dtype=getattr(torch, dtype),
            attn_implementation=CPU_GQA_ATTENTION if self.device.type == "cpu" else "sdpa",
        ).to(self.device)
        self.model.eval()
        self.revision = model_revision(model, revision)
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.vocab_size = len(self.tokenizer)
        self.logit_width = int(self.model.get_output_embeddings().weight.shape[0])
        if self.logit_width < self.vocab_size:
            raise ValueError(
                f"{model}: the model's logit width {self.logit_width} is below the "
                f"tokenizer's {self.vocab_size} tokens"
            )
        self.max_k = max_k
        self.max_model_len = max_model_len or int(self.model.config.max_position_embeddings)
        self.max_batch_tokens = max_batch_tokens
        self.limits = Limits(self.max_k, self.vocab_size, self.max_model_len, min_k=0)
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self._lock = threading.Lock()

    async def generate(self, queries: list[Query]) -> list[TeacherOutput]:
        for query in queries:
            self.limits.check(query)
        return await asyncio.to_thread(self._run, queries, self._generate_batch, _generate_len)

    async def score(self, queries: list[Query]) -> list[TeacherOutput]:
        for query in queries:
            self.limits.check(query)
        return await asyncio.to_thread(self._run, queries, self._score_batch, _score_len)

    async def close(self) -> None:
        """Drop the weights (after any running forward) so their memory is free."""
        await asyncio.to_thread(self._release)

    def _release(self) -> None:
        with self._lock:
            self.model = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _run(self, requests, run_batch, length) -> list[TeacherOutput]:
        """Run `requests` in token-bounded batches of similar length, in request order out."""
        outputs: list[TeacherOutput | None] = [None] * len(requests)
        with self._lock, torch.inference_mode():
            for indices in _batches(requests, length, self.max_batch_tokens):
                for index, output in zip(
                    indices, run_batch([requests[i] for i in indices]), strict=True
                ):
                    outputs[index] = output
        return outputs

    def _score_batch(self, batch: list[Query]) -> list[TeacherOutput]:
        """Teacher forcing of a right-padded batch; logits only from the first scored position."""
        sequences = [list(r.prompt_ids) + list(r.completion_ids) for r in batch]
        starts = [r.start for r in batch]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        # Position p's logits predict token p + 1: scoring tokens start.. needs start - 1..
        first = min(starts) - 1
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            logits_to_keep=width - first,
            use_cache=False,
        ).logits
        outputs = []
        for row, (request, sequence, start) in enumerate(
            zip(batch, sequences, starts, strict=True)
        ):
            rows = logits[row, start - 1 - first : len(sequence) - 1 - first, : self.vocab_size]
            targets = torch.tensor(sequence[start:], device=self.device)
            draws = _draw_generator(request, self.device)
            topk_ids, topk_logprobs, token_logprob, score_logprobs = _topk_and_token(
                rows, targets, request.k, request.score_ids, request.sampled, draws
            )
            if request.sampled is None:
                topk_logprobs, tail_logprob = _float32_with_tail(topk_logprobs)
            else:
                topk_logprobs, tail_logprob = _drawn_with_tail(topk_logprobs)
            outputs.append(
                TeacherOutput(
                    prompt_ids=list(request.prompt_ids),
                    completion_ids=list(request.completion_ids),
                    completion_text=self.tokenizer.decode(
                        request.completion_ids, skip_special_tokens=True
                    ),
                    logprob_start=start,
                    topk_ids=topk_ids.cpu().numpy().astype(np.int32),
                    topk_logprobs=topk_logprobs,
                    token_logprob=token_logprob.cpu().numpy(),
                    tail_logprob=tail_logprob,
                    finish_reason="stop",
                    score_logprobs=score_logprobs,
                )
            )
        return outputs

    def _generate_batch(self, batch: list[Query]) -> list[TeacherOutput]:
        """Autoregressive decoding of a left-padded batch with a KV cache.

        Finished requests leave the batch (their cache rows are dropped), so a long
        completion never makes short ones pay for its steps.
        """
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            input_ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            attention_mask[row, width - len(request.prompt_ids) :] = 1
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        budgets = [
            min(r.sampling.max_tokens, self.max_model_len - len(r.prompt_ids)) for r in batch
        ]
        generators = [_generator(r.sampling, self.device) for r in batch]
        draw_generators = [_draw_generator(r, self.device) for r in batch]
        captures = [_Capture([], [], []) for _ in batch]
        completions: list[list[int]] = [[] for _ in batch]
        finish = ["length"] * len(batch)
        # None: every query of the batch draws instead (k may be 0 for a top-k one).
        max_k = max((r.k for r in batch if r.sampled is None), default=None)
        active = list(range(len(batch)))
        cache = DynamicCache(config=self.model.config)
        step_ids = input_ids
        step_positions = position_ids
        while active:
            logits = self.model(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1, : self.vocab_size]
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            tokens = _next_tokens(
                logprobs, [batch[i].sampling for i in active], [generators[i] for i in active]
            )
            token_logprobs = logprobs.gather(-1, tokens[:, None])[:, 0]
            if max_k is not None:
                topk_logprobs, topk_ids = logprobs.topk(max_k, dim=-1)
            still = []
            for row, (index, token) in enumerate(zip(active, tokens.tolist(), strict=True)):
                request = batch[index]
                capture = captures[index]
                if request.sampled is None:
                    capture.topk_ids.append(topk_ids[row, : request.k])
                    capture.topk_logprobs.append(topk_logprobs[row, : request.k])
                else:
                    ids, drawn = _draws(
                        logprobs[row : row + 1], request.sampled, draw_generators[index]
                    )
                    capture.topk_ids.append(ids[0])
                    capture.topk_logprobs.append(drawn[0])
                capture.token_logprobs.append(token_logprobs[row].float())
                completions[index].append(token)
                if token in self.stop_ids:
                    finish[index] = "stop"
                elif len(completions[index]) < budgets[index]:
                    still.append(row)
            if not still:
                break
            if len(still) < len(active):
                keep = torch.tensor(still, device=self.device)
                cache.batch_select_indices(keep)
                attention_mask = attention_mask[keep]
                position_ids = position_ids[keep]
                tokens = tokens[keep]
                active = [active[row] for row in still]
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones((len(active), 1))], dim=-1
            )
            position_ids = position_ids[:, -1:] + 1
            step_positions = position_ids
            step_ids = tokens[:, None]
        outputs = []
        for request, capture, completion, reason in zip(
            batch, captures, completions, finish, strict=True
        ):
            with_tail = _float32_with_tail if request.sampled is None else _drawn_with_tail
            topk_logprobs, tail_logprob = with_tail(torch.stack(capture.topk_logprobs))
            outputs.append(
                TeacherOutput(
                    prompt_ids=list(request.prompt_ids),
                    completion_ids=completion,
                    completion_text=self.tokenizer.decode(completion, skip_special_tokens=True),
                    logprob_start=len(request.prompt_ids),
                    topk_ids=torch.stack(capture.topk_ids).cpu().numpy().astype(np.int32),
                    topk_logprobs=topk_logprobs,
                    token_logprob=torch.stack(capture.token_logprobs).cpu().numpy(),
                    finish_reason=reason,
                    tail_logprob=tail_logprob,
                )
            )
        return outputs


def _topk_and_token(
    logits: torch.Tensor,
    targets: torch.Tensor,
    k: int,
    score_ids: Sequence[Sequence[int]] = (),
    sampled: SampledLogits | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[np.ndarray] | None]:
    """Top-k (sorted, descending, float64), the targets' log-probs (float32) and, when
    ``score_ids`` are given (one list per position), the log-probs at those ids (float32,
    in the order given), all from an exact log-softmax computed ``_LOGSOFTMAX_ROWS``
    positions at a time in float64. With ``sampled``, the draws (``_draws``, from
    ``generator``) instead of the top-k."""
    ids, values, tokens = [], [], []
    scored: list[np.ndarray] | None = [] if score_ids else None
    for start in range(0, logits.shape[0], _LOGSOFTMAX_ROWS):
        logprobs = torch.log_softmax(logits[start : start + _LOGSOFTMAX_ROWS].double(), dim=-1)
        if sampled is None:
            top_values, top_ids = logprobs.topk(k, dim=-1)
        else:
            top_ids, top_values = _draws(logprobs, sampled, generator)
        ids.append(top_ids)
        values.append(top_values)
        chunk_targets = targets[start : start + _LOGSOFTMAX_ROWS, None]
        tokens.append(logprobs.gather(-1, chunk_targets)[:, 0].float())
        if scored is not None:
            rows = logprobs.cpu()
            for j, row in enumerate(score_ids[start : start + _LOGSOFTMAX_ROWS]):
                picked = rows[j, torch.tensor(row, dtype=torch.long)]
                scored.append(picked.float().numpy())
    return torch.cat(ids), torch.cat(values), torch.cat(tokens), scored


def _float32_with_tail(topk_logprobs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 top-k log-probs -> (float32 values, float32 tail), the tail
    ``log(1 - sum(p_topk))`` computed in float64 from the exact values: in float32 both
    the log-softmax (about 5e-6 nats high) and a tail below 1e-4 lose their digits."""
    tail = torch.log(-torch.expm1(torch.logsumexp(topk_logprobs, dim=-1)))
    return topk_logprobs.float().cpu().numpy(), tail.float().cpu().numpy()


def _draw_generator(query, device: torch.device) -> torch.Generator | None:
    """The generator of a sampled query's draws, seeded from its key (None: not sampled)."""
    if query.sampled is None:
        return None
    if query.draw_seed is None:
        raise ValueError("a sampled query needs its draw_seed (the service sets it from the key)")
    return torch.Generator(device=device).manual_seed(query.draw_seed)


def _draws(
    logprobs: torch.Tensor, sampled: SampledLogits, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """N draws per row of ``logprobs`` [n, V] (float64 log-softmax) from
    ``softmax(logprobs / T)``, as (distinct ids [n, N], ``ln(count / N)`` [n, N]) padded
    with -1 / -inf, ids ascending."""
    probs = torch.softmax(logprobs / sampled.temperature, dim=-1)
    picks = torch.multinomial(probs, sampled.draws, replacement=True, generator=generator)
    picks = picks.sort(dim=-1).values
    first = torch.ones_like(picks, dtype=torch.bool)
    first[:, 1:] = picks[:, 1:] != picks[:, :-1]
    slot = first.cumsum(dim=-1) - 1
    # Every draw of an id writes the same id to that id's slot.
    ids = torch.full_like(picks, -1).scatter(1, slot, picks)
    ones = torch.ones(picks.shape, dtype=torch.float64, device=picks.device)
    counts = torch.zeros_like(ones).scatter_add(1, slot, ones)
    return ids, (counts / sampled.draws).log()


def _drawn_with_tail(drawn: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Draws' ``ln(count / N)`` -> (float32 values, a tail of -inf: the draws are all)."""
    return drawn.float().cpu().numpy(), np.full(drawn.shape[0], -np.inf, dtype=np.float32)


def _next_tokens(
    logprobs: torch.Tensor,
    samplings: Sequence[Sampling],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Greedy (argmax) rows at temperature 0, else temperature + top-p sampling per row.

    Each sampled row draws from its own generator, so its tokens depend on its seed and
    its own logits only, never on its neighbours in the batch.
    """
    tokens = logprobs.argmax(dim=-1)
    for row, (sampling, generator) in enumerate(zip(samplings, generators, strict=True)):
        if sampling.temperature <= 0:
            continue
        probs = torch.softmax(logprobs[row] / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the top token always).
            outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        tokens[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return tokens


def _generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """A private RNG per sampled request: seeded when the request says so, else fresh."""
    if sampling.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    return generator


def _generate_len(request: Query) -> int:
    return len(request.prompt_ids) + request.sampling.max_tokens


def _score_len(request: Query) -> int:
    return len(request.prompt_ids) + len(request.completion_ids)


def _batches(requests: Sequence, length, max_tokens: int) -> Iterator[list[int]]:
    """Indices of `requests` grouped by length so rows x longest stays within `max_tokens`.

    Sorting by length keeps padding small; a request longer than the budget runs alone.
    """
    order = sorted(range(len(requests)), key=lambda i: length(requests[i]))
    batch: list[int] = []
    for index in order:
        longest = length(requests[index])
        if batch and (len(batch) + 1) * longest > max_tokens:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch
