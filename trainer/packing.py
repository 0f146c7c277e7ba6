"""Padding-free packed micro-batches: sequences back to back, each prompt laid out once for all its responses.

A sequence is prompt p (P tokens) then response r (R tokens). The model reads x = p + r[:-1] (the last response
token is never an input) and position j predicts x[j+1], so the response targets sit at positions P-1 .. P+R-2.
Responses to the same prompt in one micro-batch share it (share_prompts): the prompt is packed once, then
each response's inputs r[:-1] with positions P .. P+R-2. The prompt's hidden states are the same for every
response (causal attention: a prompt token never sees a response), so the K samples of a group cost P + K(R-1)
body tokens instead of K(P+R-1); its last hidden row feeds the head once per response (the gather's backward
sums their gradients). Positions say where each segment belongs: one starting at 0 begins a sequence, one
starting at P > 0 continues the first P tokens of the segment that began last (attention.py attends that way).
transformers' flash-attn varlen path reads only restarts at 0, so a model on it packs without sharing.

`plan_micro_batches` splits a batch's sequences across ranks balanced by tokens, then bins each rank's share
into micro-batches of at most `token_budget` packed tokens, keeping a prompt's responses together where they fit;
every rank gets the same number of micro-batches (empty slots become zero-weight fillers) because FSDP
collectives need every rank to run the same passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class PackedMicroBatch:
    """One packed micro-batch; N = packed tokens, M = response targets in it.

    input_ids, position_ids [1, N]; seqs: the batch indices packed here; per response target [M]: its place in the
    padded [n, T] response layout (rows, cols), the packed position whose hidden row predicts it (pos; the last
    prompt token's for a response's first token, so shared prompts repeat it), the token (head_targets) and its
    sequence (head_seq_ids). `filler` marks a zero-weight micro-batch that exists only so that all ranks run the
    same number of passes.
    """

    input_ids: Tensor
    position_ids: Tensor
    seqs: list[int]
    rows: Tensor
    cols: Tensor
    pos: Tensor
    head_targets: Tensor
    head_seq_ids: Tensor
    filler: bool = False

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def head_mask(self) -> Tensor:
        """[M] all True: every head row is a response target (aggregation_weights' mask argument)."""
        return torch.ones_like(self.head_targets, dtype=torch.bool)

    def head_to_padded(self, values: Tensor, out: Tensor) -> Tensor:
        """Write per-response-token `values` [M] into `out` [n, T] (skipped for a filler)."""
        if not self.filler:
            out[self.rows, self.cols] = values.to(out.dtype)
        return out

    def head_from_padded(self, padded: Tensor) -> Tensor:
        """[M] per-response-token view of a padded [n, T] tensor."""
        return padded[self.rows, self.cols]


def prompt_groups(prompts: list[list[int]], seqs: list[int]) -> list[list[int]]:
    """`seqs` grouped by identical prompt tokens: groups in order of first appearance, each in `seqs` order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in seqs:
        groups.setdefault(tuple(prompts[i]), []).append(i)
    return list(groups.values())


def packed_length(prompts: list[list[int]], responses: list[list[int]], seqs: list[int]) -> int:
    """Packed tokens of sequences that share one prompt: P + sum(R - 1) (one sequence: P + R - 1)."""
    return len(prompts[seqs[0]]) + sum(len(responses[i]) - 1 for i in seqs)


def segments(
    prompts: list[list[int]], responses: list[list[int]], seqs: list[int], *, share_prompts: bool = True
) -> list[tuple[int, int]]:
    """(tokens, prefix) of each attention segment `pack` lays out (attention.segments_from_positions reads the same
    from its positions): a group's prompt and first response form one segment, every further response one more
    with prefix P."""
    out = []
    for group in prompt_groups(prompts, seqs) if share_prompts else [[i] for i in seqs]:
        P = len(prompts[group[0]])
        out.append((P + len(responses[group[0]]) - 1, 0))
        out += [(len(responses[i]) - 1, P) for i in group[1:] if len(responses[i]) > 1]
    return out


def pack(
    prompts: list[list[int]],
    responses: list[list[int]],
    seqs: list[int],
    *,
    share_prompts: bool = True,
    device: torch.device | str = "cpu",
    filler: bool = False,
) -> PackedMicroBatch:
    """Pack sequences `seqs` (indices into prompts/responses) into one micro-batch (see module docstring)."""
    if not seqs:
        raise ValueError("pack needs at least one sequence")
    for i in seqs:
        if not prompts[i] or not responses[i]:
            raise ValueError(
                f"sequence {i} has an empty prompt ({len(prompts[i])}) or response ({len(responses[i])})"
            )
    ids, pos_ids, tgt, sid, rows, cols, pos = [], [], [], [], [], [], []
    for group in prompt_groups(prompts, seqs) if share_prompts else [[i] for i in seqs]:
        P = len(prompts[group[0]])
        ids += prompts[group[0]]
        pos_ids += range(P)
        last_prompt = len(ids) - 1
        for i in group:
            r = responses[i]
            pos += [last_prompt, *range(len(ids), len(ids) + len(r) - 1)]
            ids += r[:-1]
            pos_ids += range(P, P + len(r) - 1)
            tgt += r
            sid += [i] * len(r)
            rows += [i] * len(r)
            cols += range(len(r))
    long = dict(dtype=torch.long, device=device)
    return PackedMicroBatch(
        input_ids=torch.tensor(ids, **long)[None],
        position_ids=torch.tensor(pos_ids, **long)[None],
        seqs=list(seqs),
        rows=torch.tensor(rows, **long),
        cols=torch.tensor(cols, **long),
        pos=torch.tensor(pos, **long),
        head_targets=torch.tensor(tgt, **long),
        head_seq_ids=torch.tensor(sid, **long),
        filler=filler,
    )


def packing_units(
    prompts: list[list[int]], responses: list[list[int]], seqs: list[int], *, cap: int, share_prompts: bool
) -> list[list[int]]:
    """`seqs` in the units packing places whole: the sequences of one prompt (each sequence alone without
    sharing), a group over `cap` packed tokens cut into consecutive pieces of at most `cap` (each repeats the
    prompt; a single sequence over `cap` is a piece of its own)."""
    units = []
    for group in prompt_groups(prompts, seqs) if share_prompts else [[i] for i in seqs]:
        piece: list[int] = []
        for i in group:
            if piece and packed_length(prompts, responses, [*piece, i]) > cap:
                units.append(piece)
                piece = []
            piece.append(i)
        units.append(piece)
    return units


def split_across_ranks(lengths: list[int], world_size: int) -> list[list[int]]:
    """Longest-first greedy split of units (their packed `lengths`) over ranks by token count: unit indices per
    rank (deterministic; ties go to the lower rank)."""
    load = [0] * world_size
    share: list[list[int]] = [[] for _ in range(world_size)]
    for u in sorted(range(len(lengths)), key=lambda u: (-lengths[u], u)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        share[r].append(u)
        load[r] += lengths[u]
    return [sorted(s) for s in share]


def bin_by_budget(lengths: list[int], token_budget: int) -> list[list[int]]:
    """First-fit-decreasing bins of units (their packed `lengths`) of at most `token_budget` tokens: unit indices
    per bin. A unit over the budget raises ValueError."""
    bins: list[list[int]] = []
    room: list[int] = []
    for u in sorted(range(len(lengths)), key=lambda u: (-lengths[u], u)):
        if lengths[u] > token_budget:
            raise ValueError(f"{lengths[u]} packed tokens, over the micro-batch budget of {token_budget}")
        for b, free in enumerate(room):
            if lengths[u] <= free:
                bins[b].append(u)
                room[b] -= lengths[u]
                break
        else:
            bins.append([u])
            room.append(token_budget - lengths[u])
    return [sorted(b) for b in bins]


def plan_micro_batches(
    prompts: list[list[int]], responses: list[list[int]], seqs: list[int], *, token_budget: int,
    world_size: int = 1, share_prompts: bool = True,
) -> list[list[list[int]]]:  # fmt: skip
    """plan[rank][j] = batch indices of rank's j-th micro-batch; all ranks get the same count (maybe empty lists).

    Ranks get whole prompt groups where the balance allows (a group over 1/world of the tokens is cut), and each
    rank's share is binned in units of at most `token_budget` packed tokens."""
    for i in seqs:
        if packed_length(prompts, responses, [i]) > token_budget:
            n = packed_length(prompts, responses, [i])
            raise ValueError(f"sequence {i} has {n} tokens, over the micro-batch budget of {token_budget}")
    kw = dict(share_prompts=share_prompts)
    total = sum(packed_length(prompts, responses, [i]) for i in seqs)
    units = packing_units(prompts, responses, seqs, cap=math.ceil(total / world_size), **kw)
    plan = []
    for share in split_across_ranks([packed_length(prompts, responses, u) for u in units], world_size):
        mine = sorted(i for u in share for i in units[u])
        pieces = packing_units(prompts, responses, mine, cap=token_budget, **kw)
        bins = bin_by_budget([packed_length(prompts, responses, u) for u in pieces], token_budget)
        plan.append([sorted(i for u in b for i in pieces[u]) for b in bins])
    count = max(1, max(len(p) for p in plan))
    return [p + [[] for _ in range(count - len(p))] for p in plan]


def rank_micro_batches(
    prompts: list[list[int]],
    responses: list[list[int]],
    seqs: list[int],
    *,
    token_budget: int,
    rank: int = 0,
    world_size: int = 1,
    share_prompts: bool = True,
    device: torch.device | str = "cpu",
) -> list[PackedMicroBatch]:
    """This rank's packed micro-batches over batch indices `seqs`; empty slots become filler micro-batches."""
    plan = plan_micro_batches(
        prompts,
        responses,
        seqs,
        token_budget=token_budget,
        world_size=world_size,
        share_prompts=share_prompts,
    )
    shortest = min(seqs, key=lambda s: (packed_length(prompts, responses, [s]), s))
    kw = dict(share_prompts=share_prompts, device=device)
    return [
        pack(prompts, responses, mb, **kw) if mb else pack(prompts, responses, [shortest], filler=True, **kw)
        for mb in plan[rank]
    ]
