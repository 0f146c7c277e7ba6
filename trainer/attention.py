"""Causal attention over a packed micro-batch without a dense [N, N] block-diagonal mask.

transformers' sdpa/eager backends turn restarting position_ids into a dense boolean mask, so attention over a
packed micro-batch of N tokens costs N^2 however short its sequences are (issue 14: 4096-token micro-batches were
1.5x slower per iteration than 1024-token ones). Registered as the attention backend "fastprime_packed", this
attends within each packed sequence only, by one of two exact strategies:

- "per_sequence": one `scaled_dot_product_attention(is_causal=True)` per sequence: sum(L_i^2) work, one call each.
- "padded": the sequences gathered into a [S, H, L_max, d] batch, one is_causal SDPA call, rows gathered back.
  Exact because the padding sits after each sequence's tokens, where causal attention never looks from a real
  query; costs S * L_max^2 and two gathers, which wins when the sequences are many, short and alike.

`choose_strategy` picks by cost (measured on CPU: benchmarks/bench_packed_attention.py and its results file).
On CUDA the trainer keeps transformers' flash_attention_2 varlen path when asked for (it needs no mask), else
this backend. Without packed-sequence boundaries (no position_ids, e.g. a plain single sequence) it is causal
attention over the whole input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "fastprime_packed"
STRATEGIES = ("per_sequence", "padded")
# Padded SDPA pays S * L_max^2 plus gathers; per-sequence pays one call per sequence. Measured on a 2-core CPU
# (benchmarks/results/packed_attention_cpu.md): padded wins once the sequences are numerous and the padding waste
# (S * L_max^2 over sum L_i^2) is small.
PADDED_MIN_SEQS = 16
PADDED_MAX_WASTE = 2.5


def sequence_lengths_from_positions(position_ids: Tensor) -> list[int]:
    """[1, N] position ids restarting at 0 per sequence -> the packed sequences' lengths (one host read)."""
    pos = position_ids[0]
    starts = torch.nonzero(pos == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    bounds = [*starts, pos.shape[0]]
    return [b - a for a, b in zip(bounds, bounds[1:]) if b > a]


def choose_strategy(lengths: list[int]) -> str:
    """'padded' for many sequences of alike length, else 'per_sequence' (see the module constants)."""
    if len(lengths) < PADDED_MIN_SEQS:
        return "per_sequence"
    waste = len(lengths) * max(lengths) ** 2 / sum(n * n for n in lengths)
    return "padded" if waste <= PADDED_MAX_WASTE else "per_sequence"


def packed_causal_attention(
    query: Tensor, key: Tensor, value: Tensor, lengths: list[int], *, scale: float, strategy: str = "auto"
) -> Tensor:
    """query [1, H, N, d], key/value [1, Hkv, N, d] (H a multiple of Hkv) -> [1, H, N, d], causal per sequence."""
    if strategy == "auto":
        strategy = choose_strategy(lengths)
    gqa = query.shape[1] != key.shape[1]
    if strategy == "per_sequence" or len(lengths) == 1:
        # split, not one slice per sequence: each slice's backward zero-fills a gradient as large as the whole
        # micro-batch (S sequences: S full-size fills and adds per tensor and layer); split's is one cat
        parts = zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
        outs = [
            F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
            for q, k, v in parts
        ]
        return torch.cat(outs, dim=2)
    if strategy != "padded":
        raise ValueError(f"attention strategy {strategy!r} is not one of {STRATEGIES + ('auto',)}")
    idx, valid = _padded_index(lengths, query.device)  # [S, L_max]

    def batch(x: Tensor) -> Tensor:  # [1, h, N, d] -> [S, h, L_max, d]
        return x[0][:, idx].transpose(0, 1)

    out = F.scaled_dot_product_attention(
        batch(query), batch(key), batch(value), is_causal=True, scale=scale, enable_gqa=gqa
    )
    return out.transpose(0, 1)[:, valid][None]  # [S, H, L, d] -> [H, N, d] in packed order


def _padded_index(lengths: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """(idx [S, L_max] packed position of each padded slot (padding repeats a real one), valid [S, L_max])."""
    L = max(lengths)
    starts = torch.tensor([0, *lengths[:-1]], device=device).cumsum(0)
    n = torch.tensor(lengths, device=device)
    col = torch.arange(L, device=device)
    valid = col[None, :] < n[:, None]
    idx = starts[:, None] + torch.minimum(col[None, :], n[:, None] - 1)
    return idx, valid


def packed_attention_forward(
    module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling: float | None = None,
    dropout: float = 0.0, **kwargs,
) -> tuple[Tensor, None]:  # fmt: skip
    """transformers attention-interface signature; returns ([B, N, H, d], None) like its sdpa backend."""
    if dropout:
        raise ValueError(f"the {NAME} attention backend has no dropout (got {dropout})")
    if attention_mask is not None:
        raise ValueError(f"the {NAME} attention backend takes packed sequences, not an attention mask")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[0] != 1:
        gqa = query.shape[1] != key.shape[1]
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        lengths = kwargs.get("packed_lengths") or sequence_lengths_from_positions(position_ids)
        out = packed_causal_attention(query, key, value, lengths, scale=scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the backend with transformers (idempotent); returns its name for `config._attn_implementation`."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention_forward)
    return NAME
