"""Causal attention over a packed micro-batch without a dense [N, N] block-diagonal mask.

transformers' sdpa/eager backends turn restarting position_ids into a dense boolean mask, so attention over a
packed micro-batch of N tokens costs N^2 however short its sequences are (issue 14: 4096-token micro-batches were
1.5x slower per iteration than 1024-token ones). Registered as the attention backend "fastprime_packed", this
attends within each packed sequence only. A sequence may be split into segments (packing.py): a prompt packed once
with its first response, then each further response to it, whose positions start at P and which attends to the
prompt's first P tokens and then causally to itself. Two exact strategies:

- "per_sequence": one `scaled_dot_product_attention` per segment (is_causal; a continuation gets the prompt's keys
  in front and a bottom-right-aligned causal mask): sum of L_i (p_i + L_i) work, one call each.
- "padded": the segments gathered into a [S, H, L_max, d] batch, one SDPA call, rows gathered back. Plain
  sequences use is_causal, exact because the padding sits after each sequence's tokens, where causal attention
  never looks from a real query; continuations take their prompt's keys in front and an explicit mask. Costs
  S * L_max * (p + L)_max and the gathers, which wins when the segments are many, short and alike.

`choose_strategy` picks by cost (measured on CPU: benchmarks/bench_packed_attention.py and its results file).
On CUDA the trainer keeps transformers' flash_attention_2 varlen path when asked for (it needs no mask; packing
then lays each prompt out per response, since varlen reads only restarts at 0), else this backend. Without
packed-sequence boundaries (no position_ids, e.g. a plain single sequence) it is causal attention over the whole
input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "fastprime_packed"
STRATEGIES = ("per_sequence", "padded")
# Padded SDPA pays S * L_max^2 plus gathers; per-sequence pays one call per sequence. Measured on a 2-core CPU
# (benchmarks/results/packed_attention_cpu.md): padded wins once the segments are numerous and the padding waste
# (S * L_max * (p + L)_max over sum L_i (p_i + L_i)) is small.
PADDED_MIN_SEQS = 16
PADDED_MAX_WASTE = 2.5


def segments_from_positions(position_ids: Tensor) -> list[tuple[int, int]]:
    """[1, N] packed position ids -> the segments (tokens, prefix) in packed order (one host read).

    A segment is a run of consecutive positions. One starting at position 0 is a sequence (or a shared prompt);
    one starting at p > 0 is a response continuing the first p tokens of the last segment that started at 0
    (packing.py lays a prompt out once before its responses). prefix = the segment's first position."""
    pos = position_ids[0]
    starts = [0, *(torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist()]
    first = pos[starts].tolist()
    bounds = [*starts, pos.shape[0]]
    return [(b - a, p) for a, b, p in zip(bounds, bounds[1:], first)]


def choose_strategy(segments: list[tuple[int, int]]) -> str:
    """'padded' for many segments of alike size, else 'per_sequence' (see the module constants)."""
    if len(segments) < PADDED_MIN_SEQS:
        return "per_sequence"
    q_max, k_max = max(n for n, _ in segments), max(n + p for n, p in segments)
    waste = len(segments) * q_max * k_max / sum(n * (n + p) for n, p in segments)
    return "padded" if waste <= PADDED_MAX_WASTE else "per_sequence"


def packed_causal_attention(
    query: Tensor, key: Tensor, value: Tensor, segments: list[tuple[int, int]], *, scale: float,
    strategy: str = "auto",
) -> Tensor:  # fmt: skip
    """query [1, H, N, d], key/value [1, Hkv, N, d] (H a multiple of Hkv) -> [1, H, N, d], causal per sequence.

    segments: (tokens, prefix) in packed order (`segments_from_positions`); a segment with prefix p > 0 also
    attends to the first p tokens of the last segment with prefix 0, its shared prompt."""
    if strategy == "auto":
        strategy = choose_strategy(segments)
    if strategy not in STRATEGIES:
        raise ValueError(f"attention strategy {strategy!r} is not one of {STRATEGIES + ('auto',)}")
    gqa = query.shape[1] != key.shape[1]
    lengths = [n for n, _ in segments]
    if strategy == "padded" and len(segments) > 1:
        return _padded_attention(query, key, value, segments, scale=scale, gqa=gqa)
    # split, not one slice per sequence: each slice's backward zero-fills a gradient as large as the whole
    # micro-batch (S sequences: S full-size fills and adds per tensor and layer); split's is one cat
    outs, masks = [], {}
    for (n, p), q, k, v in zip(segments, *(x.split(lengths, dim=2) for x in (query, key, value))):
        if p == 0:
            prompt_k, prompt_v = k, v
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa))
            continue
        if (n, p) not in masks:
            masks[n, p] = _continuation_mask(n, p, query.device)
        k, v = torch.cat([prompt_k[:, :, :p], k], dim=2), torch.cat([prompt_v[:, :, :p], v], dim=2)
        outs.append(
            F.scaled_dot_product_attention(q, k, v, attn_mask=masks[n, p], scale=scale, enable_gqa=gqa)
        )
    return torch.cat(outs, dim=2)


def _continuation_mask(n: int, p: int, device: torch.device) -> Tensor:
    """[n, p + n] bool: query i (position p + i) sees keys 0 .. p + i (causal, aligned bottom-right)."""
    return torch.arange(p + n, device=device)[None, :] <= p + torch.arange(n, device=device)[:, None]


def _padded_attention(
    query: Tensor, key: Tensor, value: Tensor, segments: list[tuple[int, int]], *, scale: float, gqa: bool
) -> Tensor:
    """All segments gathered into one [S, h, L, d] batch and one SDPA call, rows gathered back.

    Without shared prompts it is is_causal SDPA over sequences padded at their ends, where causal attention never
    looks from a real query. With them, segment s's keys are its prompt's first p tokens then its own, and an
    explicit mask keeps each query to its causal past and off the padding."""
    device = query.device
    q_idx, q_valid = _padded_index([(n, 0) for n, _ in segments], device)
    if all(p == 0 for _, p in segments):
        k_idx, mask = q_idx, None
    else:
        k_idx, k_valid = _padded_index(segments, device)
        prefix = torch.tensor([p for _, p in segments], device=device)
        rows = prefix[:, None] + torch.arange(q_idx.shape[1], device=device)[None, :]  # each query's position
        cols = torch.arange(k_idx.shape[1], device=device)
        mask = ((cols[None, None, :] <= rows[:, :, None]) & k_valid[:, None, :])[:, None]  # [S, 1, Lq, Lk]

    def batch(x: Tensor, idx: Tensor) -> Tensor:  # [1, h, N, d] -> [S, h, L, d]
        return x[0][:, idx].transpose(0, 1)

    out = F.scaled_dot_product_attention(
        batch(query, q_idx), batch(key, k_idx), batch(value, k_idx), attn_mask=mask, is_causal=mask is None,
        scale=scale, enable_gqa=gqa,
    )  # fmt: skip
    return out.transpose(0, 1)[:, q_valid][None]  # [S, H, L, d] -> [H, N, d] in packed order


def _padded_index(segments: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """(idx [S, L_max]: packed position of each segment's keys, prompt prefix first; padding repeats a real one,
    valid [S, L_max]) for segments (tokens, prefix)."""
    starts, root, prev = [], 0, 0
    for n, p in segments:
        if p == 0:
            root = prev
        starts.append((root, prev, n, p))
        prev += n
    L = max(n + p for n, p in segments)
    col = torch.arange(L, device=device)
    prompt_start = torch.tensor([r for r, _, _, _ in starts], device=device)
    own_start = torch.tensor([s for _, s, _, _ in starts], device=device)
    n = torch.tensor([n for _, _, n, _ in starts], device=device)
    p = torch.tensor([p for _, _, _, p in starts], device=device)
    valid = col[None, :] < (n + p)[:, None]
    c = torch.minimum(col[None, :], (n + p - 1)[:, None])
    idx = torch.where(c < p[:, None], prompt_start[:, None] + c, own_start[:, None] + c - p[:, None])
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
        segments = kwargs.get("packed_segments") or segments_from_positions(position_ids)
        out = packed_causal_attention(query, key, value, segments, scale=scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the backend with transformers (idempotent); returns its name for `config._attn_implementation`."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention_forward)
    return NAME
