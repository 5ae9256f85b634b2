"""The student: loaded, checked against the shards, and wrapped so one forward gives a loss.

``DistillStudent`` runs the model's body to its final hidden states, picks the positions
that have a target and hands them to the chunked head (``sparse_kd``), so the model's own
``lm_head`` is never applied to the whole sequence. The loss lives inside ``forward`` so
that DDP and FSDP see the head's weight used inside the module they wrap (FSDP gathers
the weight only for the duration of the root module's forward).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.generation.utils import GenerateOutput

from distillcache.shared.keys import tokenizer_hash
from distillcache.shared.schema import DatasetInfo

from .aligned_data import AlignedBatch
from .batching import Batch
from .cross_tokenizer import CrossSpec, cross_head_loss
from .onpolicy import OnPolicyBatch
from .sparse_kd import LossSpec, chunked_head_loss, chunked_head_metrics, union_head_loss
from .teacher_client import TeacherTokenizer

# Config attributes of architectures whose logits are transformed after the linear head;
# the chunked head computes hidden @ W.T only, so such students would train on wrong logits.
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class TokenizerMismatch(ValueError):
    """The student's tokenizer is not the one the shards' token ids belong to."""


def check_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    info: DatasetInfo | TeacherTokenizer,
    holder: str = "the shards were made with",
) -> None:
    """Refuse a student whose vocabulary differs from the teacher's: the one in the shards
    (``info`` a dataset's ``DatasetInfo``), or the served one (``TeacherTokenizer``, with
    ``holder`` naming the service).

    Compared by ``shared.keys.tokenizer_hash`` (vocabulary and special tokens), before any
    pad token is added. Top-k ids are only meaningful to a student with the same ids.
    """
    got = tokenizer_hash(tokenizer)
    if got != info.tokenizer_hash:
        raise TokenizerMismatch(
            f"the student's tokenizer ({name}, vocabulary hash {got[:12]}) is not the one "
            f"{holder} ({info.tokenizer}, hash {info.tokenizer_hash[:12]}): the "
            "teacher's top-k token ids would mean other tokens to this student. Add "
            "--cross-tokenizer (config: cross_tokenizer = true) to distil across tokenizers "
            "(the cached text is retokenized and aligned), or pick a student that shares the "
            "teacher's tokenizer."
        )
    if len(tokenizer) != info.vocab_size:
        raise TokenizerMismatch(
            f"the student's tokenizer has {len(tokenizer)} tokens, {holder} {info.vocab_size}"
        )


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)


def load_student(path: str, vocab_size: int) -> nn.Module:
    """The student in float32 (master weights; bf16 comes from autocast), checked for a
    head the chunked loss can drive: a plain linear layer at least ``vocab_size`` wide."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for attribute in _HEAD_TRANSFORMS:
        value = getattr(model.config, attribute, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"{path}: {attribute}={value} transforms the logits after the output layer, "
                "which the chunked head does not reproduce"
            )
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"{path}: the output head must be a linear layer without bias")
    width = head.weight.shape[0]
    if width < vocab_size:
        raise ValueError(
            f"{path}: the model's logit width {width} is smaller than the tokenizer's "
            f"{vocab_size} tokens"
        )
    return model


class DistillStudent(nn.Module):
    """A causal LM whose forward returns the distillation loss of a batch (or eval sums).

    Logit rows past ``spec.vocab_size`` (a padded head, e.g. 152,064 rows for 151,665
    tokens) are left out of every softmax. With ``cross`` (a student of another
    tokenizer) the batches are ``AlignedBatch`` es and the loss is ``cross_tokenizer``'s.
    """

    def __init__(self, model: nn.Module, spec: LossSpec, cross: CrossSpec | None = None) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.cross = cross

    def forward(
        self, batch: Batch | None = None, evaluate: bool = False, generate: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor | GenerateOutput:
        if generate is not None:
            # On-policy sampling (``model.generate(**generate)``) enters here too: under
            # FSDP only the root's forward gathers the embedding and the head.
            return self.model.generate(**generate)
        assert batch is not None
        hidden = self.model.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        hidden = hidden[batch.target_rows, batch.target_cols]
        weight = self.model.get_output_embeddings().weight
        if isinstance(batch, AlignedBatch):
            return self._cross(hidden, weight, batch, evaluate)
        targets = (batch.labels, batch.topk_ids, batch.topk_logprobs, batch.tail_logprob)
        if evaluate and isinstance(batch, OnPolicyBatch):
            return self._on_policy_metrics(hidden, weight, batch)
        if evaluate:
            return chunked_head_metrics(
                hidden, weight, *targets, self.spec.vocab_size, self.spec.chunk_size
            )
        if isinstance(batch, OnPolicyBatch):  # the student's own samples (onpolicy.py)
            return self._union(hidden, weight, batch, self.spec)
        return chunked_head_loss(hidden, weight, *targets, self.spec)

    @staticmethod
    def _union(
        hidden: torch.Tensor, weight: torch.Tensor, batch: OnPolicyBatch, spec: LossSpec
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return union_head_loss(
            hidden,
            weight,
            batch.labels,
            batch.topk_ids,
            batch.topk_logprobs,
            batch.score_ids,
            batch.score_logprobs,
            spec,
        )

    def _on_policy_metrics(
        self, hidden: torch.Tensor, weight: torch.Tensor, batch: OnPolicyBatch
    ) -> torch.Tensor:
        """Evaluation sums on the student's own samples: ``chunked_head_metrics``' four
        (CE is then the student's own surprise), 0 bytes, and the reverse KL(student ||
        teacher) at T=1 on the union of both top sets plus bucket, what GKD minimizes."""
        targets = (batch.labels, batch.topk_ids, batch.topk_logprobs, batch.tail_logprob)
        sums = chunked_head_metrics(
            hidden, weight, *targets, self.spec.vocab_size, self.spec.chunk_size
        )
        spec = LossSpec(
            vocab_size=self.spec.vocab_size, loss="reverse_kl", chunk_size=self.spec.chunk_size
        )
        with torch.no_grad():
            _, (reverse_kl, _) = self._union(hidden, weight, batch, spec)
        return torch.cat([sums, sums.new_zeros(1), reverse_kl.double().view(1)])

    def _cross(
        self, hidden: torch.Tensor, weight: torch.Tensor, batch: AlignedBatch, evaluate: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """The cross-tokenizer loss, or evaluation sums [chunk forward KL at T=1 (on the
        matched ids plus bucket, unmatched L1), 0 (no top-1 agreement across
        vocabularies), CE on the student's tokens, positions, completion bytes]."""
        if self.cross is None:
            raise ValueError("an aligned batch needs the cross-tokenizer spec (cross_tokenizer)")
        mapped = self.cross.student_mapped.to(hidden.device)
        if not evaluate:
            return cross_head_loss(
                hidden, weight, batch, replace(self.cross, student_mapped=mapped)
            )
        spec = LossSpec(vocab_size=self.spec.vocab_size, chunk_size=self.spec.chunk_size)
        with torch.no_grad():
            _, (kd, ce) = cross_head_loss(
                hidden, weight, batch, CrossSpec(loss=spec, student_mapped=mapped)
            )
        return torch.stack(
            [
                kd.double(),
                torch.zeros((), dtype=torch.float64, device=kd.device),
                ce.double(),
                torch.tensor(float(batch.n_targets), dtype=torch.float64, device=kd.device),
                torch.tensor(float(batch.completion_bytes), dtype=torch.float64, device=kd.device),
            ]
        )
