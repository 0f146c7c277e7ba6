"""Grouped-query attention for the decode loop (decode.py) without copying the KV cache once per step.

transformers' sdpa backend expands the key/value cache to every query head (`repeat_kv`) whenever a mask is
given, which on CPU is always (left-padded prompts), and in decoding it does so at every step for the whole
cache: on the demo model that copy and its reshape were a quarter of a rollout's time (issue 14). Here the G
query heads that share a key/value head are stacked along the query axis instead, `[B, Hkv, G * q, d]`, and
the mask repeated G times along its query axis: one SDPA call over the cache as stored. Exact, the same
products and sums; where that trick does not apply (no mask with q > 1, which needs a causal mask per group;
a per-head mask; a position bias; dropout) it is transformers' sdpa itself.

Registered as the attention backend "fastprime_decode" with transformers' sdpa mask builder; the HF rollout
engine switches its own copy of the policy to it (trainer/rollout.py).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "fastprime_decode"


def grouped_query_attention(
    module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    dropout: float = 0.0, scaling: float | None = None, **kwargs,
) -> tuple[Tensor, None]:  # fmt: skip
    """transformers attention-interface signature: query [B, H, q, d], key/value [B, Hkv, L, d] -> [B, q, H, d]."""
    batch, heads, q_len, dim = query.shape
    groups = heads // key.shape[1]
    plain = (
        groups == 1 or dropout or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
    )
    if (
        plain
        or (attention_mask is None and q_len > 1)
        or (attention_mask is not None and attention_mask.shape[1] != 1)
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    stacked = query.reshape(batch, key.shape[1], groups * q_len, dim)  # heads kv*G + r share kv head `kv`
    mask = (
        attention_mask.repeat(1, 1, groups, 1) if attention_mask is not None and q_len > 1 else attention_mask
    )
    out = F.scaled_dot_product_attention(stacked, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the backend and its mask builder with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_query_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
