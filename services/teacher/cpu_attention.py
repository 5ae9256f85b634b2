"""An attention implementation for the CPU: transformers' SDPA with grouped K/V heads.

Registered with transformers under ``CPU_GQA_ATTENTION`` when this module is imported;
the transformers backend selects it on CPU.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CPU_GQA_ATTENTION = "distillcache_sdpa_gqa"


def sdpa_with_grouped_kv(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with grouped K/V heads handed to the kernel as they are.

    With a padding mask, transformers copies every K/V head group-fold (``repeat_kv``)
    before each attention call, because CUDA's masked kernels lack GQA. PyTorch's CPU
    kernel takes ``enable_gqa`` with a mask and gives bit-identical results, so on CPU
    that copy of the whole KV cache per layer and step is pure waste. Measured on
    SmolLM2 (9 query / 3 KV heads), 16 rows, one thread, same logits bit for bit: a
    decode step took 146 -> 125 ms after 64 generated tokens, 206 -> 141 ms after 256.
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_length, kv_length = query.shape[2], key.shape[2]
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=bool(causal and attention_mask is None and q_length == kv_length > 1),
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(CPU_GQA_ATTENTION, sdpa_with_grouped_kv)
AttentionMaskInterface.register(CPU_GQA_ATTENTION, sdpa_mask)
