"""Causal attention over a packed micro-batch without a dense [N, N] block-diagonal mask.

transformers' sdpa/eager backends turn restarting position_ids into a dense boolean mask, so attention over a
packed micro-batch of N tokens costs N^2 however short its sequences are (issue 14: 4096-token micro-batches were
1.5x slower per iteration than 1024-token ones). Registered as the attention backend "fastprime_packed", this
attends within each packed sequence only. A sequence may be split into segments (packing.py): a prompt packed once
with its first response, then each further response to it, whose positions start at P and which attends to the
prompt's first P tokens and then causally to itself.

One `scaled_dot_product_attention` call per sequence (is_causal) or per prompt group (the prompt and its responses,
with a [G, G] mask built once per forward and shared by the layers); a group over GROUP_MASK_MAX_TOKENS goes one
call per segment instead, each response with its prompt's keys in front and a bottom-right-aligned causal mask.
Gathering the sequences into one length-padded batch (one call, S * L_max^2 work) measured slower at every size
tried on an idle 2-core CPU, at 1 and 2 threads (benchmarks/results/packed_attention_cpu.md), and was removed.
On CUDA the trainer keeps transformers' flash_attention_2 varlen path when asked for (it needs no mask; packing
then lays each prompt out per response, since varlen reads only restarts at 0), else this backend. Without
packed-sequence boundaries (no position_ids, e.g. a plain single sequence) it is causal attention over the whole
input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "fastprime_packed"
# A prompt packed with its responses (packing.py) attends in one call with a [G, G] mask up to this many tokens
# (4 MiB of mask, built once per forward): fewer, larger calls than one per response, at the price of computing
# masked-out entries (several times the needed ones for 4 short responses); larger groups go one call per segment.
GROUP_MASK_MAX_TOKENS = 2048


@dataclass
class PackedLayout:
    """One packed micro-batch's attention segments, read from its positions once per forward (HeadlessLM), and
    the masks its layers share."""

    segments: list[tuple[int, int]]
    masks: dict = field(default_factory=dict)

    @classmethod
    def from_positions(cls, position_ids: Tensor) -> PackedLayout:
        return cls(segments_from_positions(position_ids))


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


def packed_causal_attention(
    query: Tensor, key: Tensor, value: Tensor, segments: list[tuple[int, int]], *, scale: float,
    masks: dict | None = None,
) -> Tensor:  # fmt: skip
    """query [1, H, N, d], key/value [1, Hkv, N, d] (H a multiple of Hkv) -> [1, H, N, d], causal per sequence.

    segments: (tokens, prefix) in packed order (`segments_from_positions`); a segment with prefix p > 0 also
    attends to the first p tokens of the last segment with prefix 0, its shared prompt. masks: a cache of the
    boolean masks it builds, to share across the layers of one forward (PackedLayout)."""
    gqa = query.shape[1] != key.shape[1]
    masks = {} if masks is None else masks
    groups = _prompt_groups(segments)
    sizes = [sum(n for n, _ in g) for g in groups]
    # split, not one slice per group: each slice's backward zero-fills a gradient as large as the whole
    # micro-batch (S sequences: S full-size fills and adds per tensor and layer); split's is one cat
    outs = []
    for group, size, q, k, v in zip(groups, sizes, *(x.split(sizes, dim=2) for x in (query, key, value))):
        if len(group) == 1:
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa))
        elif size <= GROUP_MASK_MAX_TOKENS:  # one call for a prompt and all its responses
            if tuple(group) not in masks:
                masks[tuple(group)] = _group_mask(group, query.device)
            mask = masks[tuple(group)]
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa))
        else:
            outs.append(_per_segment(q, k, v, group, scale=scale, gqa=gqa, masks=masks))
    return torch.cat(outs, dim=2)


def _prompt_groups(segments: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Segments in groups: each starting segment (prefix 0) with the continuations that follow it."""
    groups: list[list[tuple[int, int]]] = []
    for n, p in segments:
        if p == 0 or not groups:
            groups.append([])
        groups[-1].append((n, p))
    return groups


def _group_mask(group: list[tuple[int, int]], device: torch.device) -> Tensor:
    """[G, G] bool over a group's tokens: each token sees its own segment's causal past and, in a continuation
    with prefix p, the group's first p tokens (its prompt)."""
    n = torch.tensor([n for n, _ in group], device=device)
    seg = torch.repeat_interleave(torch.arange(len(group), device=device), n)
    prefix = torch.tensor([p for _, p in group], device=device)[seg]
    t = torch.arange(seg.shape[0], device=device)
    causal_own = (seg[:, None] == seg[None, :]) & (t[None, :] <= t[:, None])
    return causal_own | (t[None, :] < prefix[:, None])


def _per_segment(
    q: Tensor, k: Tensor, v: Tensor, group: list[tuple[int, int]], *, scale: float, gqa: bool, masks: dict
) -> Tensor:
    """A group too large for one [G, G] mask: one call per segment, each continuation with its prompt's keys in
    front and a bottom-right-aligned causal mask."""
    lengths = [n for n, _ in group]
    outs = []
    for (n, p), q_s, k_s, v_s in zip(group, *(x.split(lengths, dim=2) for x in (q, k, v))):
        if p == 0:
            prompt_k, prompt_v = k_s, v_s
            outs.append(
                F.scaled_dot_product_attention(q_s, k_s, v_s, is_causal=True, scale=scale, enable_gqa=gqa)
            )
            continue
        if (n, p) not in masks:
            masks[n, p] = _continuation_mask(n, p, q.device)
        k_s, v_s = torch.cat([prompt_k[:, :, :p], k_s], dim=2), torch.cat([prompt_v[:, :, :p], v_s], dim=2)
        outs.append(
            F.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=masks[n, p], scale=scale, enable_gqa=gqa)
        )
    return torch.cat(outs, dim=2)


def _continuation_mask(n: int, p: int, device: torch.device) -> Tensor:
    """[n, p + n] bool: query i (position p + i) sees keys 0 .. p + i (causal, aligned bottom-right)."""
    return torch.arange(p + n, device=device)[None, :] <= p + torch.arange(n, device=device)[:, None]


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
        layout = kwargs.get("packed_layout") or PackedLayout.from_positions(position_ids)
        out = packed_causal_attention(query, key, value, layout.segments, scale=scale, masks=layout.masks)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the backend with transformers (idempotent); returns its name for `config._attn_implementation`."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention_forward)
    return NAME
