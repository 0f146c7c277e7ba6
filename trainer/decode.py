"""The decode loop over a transformers model and its KV cache: the HF rollout engine's sampling and every
greedy evaluation (the trainer's and the warm start's) run through it, not through `generate`.

Why not `generate`: it keeps decoding a finished response until the longest of the batch ends (on the demo,
responses of 35 tokens on average in batches whose longest has 52: a third of the decode work), it prefills a
prompt once per sample, and it merges the checkpoint's generation_config (a repetition_penalty would silently
change both sampling and "greedy" evaluation). Here finished rows leave the batch and the cache, each prompt is
prefilled once, and the next token is exactly what `pick` says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache


@dataclass
class Rollout:
    """One sampled response: token ids (ending with EOS unless truncated) and whether it hit the length limit."""

    response_ids: list[int]
    truncated: bool


def sample_token(logits: Tensor, *, temperature: float, top_p: float) -> Tensor:
    """One token per row of logits [B, V]: softmax(logits / temperature), restricted to the top_p nucleus.

    The nucleus is transformers' (TopPLogitsWarper): the smallest set of most probable tokens whose probabilities
    sum to more than top_p, the most probable token always kept."""
    logits = logits.float() / temperature
    if top_p < 1.0:
        ascending, order = logits.sort(dim=-1)
        outside = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        outside[:, -1] = False
        logits = logits.masked_fill(outside.scatter(1, order, outside), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)


def greedy_token(logits: Tensor) -> Tensor:
    return logits.argmax(-1)


@torch.no_grad()
def decode(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    n: int,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    pick: Callable[[Tensor], Tensor],
) -> list[Rollout]:
    """n responses to each prompt (token ids without padding), grouped by prompt: [p0 x n, p1 x n, ...].

    Each step's token is `pick(logits [rows, V])`; a response ends at any of `eos_token_ids` (kept) or after
    `max_new_tokens`. The model runs as it is (eval mode and attention backend are the caller's)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: every prompt continues from its last real token
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    positions = (attn.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = model(
        input_ids=ids, attention_mask=attn, position_ids=positions, past_key_values=cache, logits_to_keep=1
    ).logits[:, -1]
    # Each prompt is prefilled once, then its cache is copied for its n rows.
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits, attn = logits.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)
    position = positions[:, -1].repeat_interleave(n) + 1
    rows = len(prompts) * n
    eos = torch.tensor(eos_token_ids, device=device)
    alive = torch.arange(rows, device=device)  # the rows still decoding, in cache order
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        token = pick(logits)
        tokens[alive, step] = token
        lengths[alive] += 1
        going = (~torch.isin(token, eos)).nonzero().squeeze(1)  # the step's one host sync
        if step == max_new_tokens - 1 or len(going) == 0:
            break
        if len(going) < len(alive):  # drop the finished rows from the batch and the cache
            alive, token, attn, position = alive[going], token[going], attn[going], position[going]
            cache.batch_select_indices(going)
        attn = torch.cat([attn, attn.new_ones(len(alive), 1)], dim=1)
        logits = model(
            input_ids=token[:, None],
            attention_mask=attn,
            position_ids=position[:, None],
            past_key_values=cache,
        ).logits[:, -1]
        position = position + 1
    return [
        Rollout(row[:length], truncated=row[length - 1] not in eos_token_ids)
        for row, length in zip(tokens.tolist(), lengths.tolist())
    ]
