"""Padding-free packed micro-batches: prompt+response sequences back to back, position_ids restarting at 0.

A sequence is prompt p (P tokens) then response r (R tokens). The model reads x = p + r[:-1] (the last response
token is never an input) and position j predicts x[j+1], so the response targets sit at packed positions
P-1 .. P+R-2. With `attention_mask=None` and `use_cache=False`, transformers derives the sequence boundaries
from the restarting position_ids (masking_utils.find_packed_sequence_indices for sdpa/eager, varlen for
flash-attn), so no token attends across sequences.

`plan_micro_batches` splits a batch's sequences across ranks balanced by tokens, then bins each rank's share
into micro-batches of at most `token_budget` tokens; every rank gets the same number of micro-batches (empty
slots become zero-weight fillers) because FSDP collectives need every rank to run the same passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class PackedMicroBatch:
    """One packed micro-batch; N = packed tokens, M = response targets in it.

    input_ids, position_ids [1, N]; targets [N] (next token at response positions, IGNORE_INDEX elsewhere);
    seq_ids [N] (batch index of the sequence at response positions, -1 elsewhere); response_mask [N] bool;
    seqs: the batch indices packed here, in order; rows, cols [M]: where each response target lives in the
    padded [n, T] response layout, and pos [M] its packed position. `filler` marks a zero-weight micro-batch
    that exists only so that all ranks run the same number of passes.
    """

    input_ids: Tensor
    position_ids: Tensor
    targets: Tensor
    seq_ids: Tensor
    response_mask: Tensor
    seqs: list[int]
    rows: Tensor
    cols: Tensor
    pos: Tensor
    filler: bool = False

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to_padded(self, values: Tensor, out: Tensor) -> Tensor:
        """Write packed per-token `values` [N] into `out` [n, T] at this micro-batch's response slots."""
        if not self.filler:
            out[self.rows, self.cols] = values[self.pos].to(out.dtype)
        return out

    # The head's view: only the M response positions have targets, so only their hidden rows go into the fused
    # head (`HeadlessLM(..., rows=mb.pos)`); per-token head inputs and outputs are then [M], in `pos` order.
    @property
    def head_targets(self) -> Tensor:
        return self.targets[self.pos]

    @property
    def head_seq_ids(self) -> Tensor:
        return self.seq_ids[self.pos]

    @property
    def head_mask(self) -> Tensor:
        return self.response_mask[self.pos]

    def head_to_padded(self, values: Tensor, out: Tensor) -> Tensor:
        """Write per-response-token `values` [M] into `out` [n, T] (skipped for a filler)."""
        if not self.filler:
            out[self.rows, self.cols] = values.to(out.dtype)
        return out

    def head_from_padded(self, padded: Tensor) -> Tensor:
        """[M] per-response-token view of a padded [n, T] tensor."""
        return padded[self.rows, self.cols]

    def from_padded(self, padded: Tensor) -> Tensor:
        """Packed [N] view of a padded [n, T] tensor (zeros at non-response positions)."""
        out = torch.zeros(self.num_tokens, dtype=padded.dtype, device=padded.device)
        out[self.pos] = padded[self.rows, self.cols].to(out.device)
        return out


def sequence_lengths(prompts: list[list[int]], responses: list[list[int]]) -> list[int]:
    """Packed length of each sequence: P + R - 1 (the last response token is only a target)."""
    return [len(p) + len(r) - 1 for p, r in zip(prompts, responses)]


def pack(
    prompts: list[list[int]],
    responses: list[list[int]],
    seqs: list[int],
    *,
    device: torch.device | str = "cpu",
    filler: bool = False,
) -> PackedMicroBatch:
    """Pack sequences `seqs` (indices into prompts/responses) into one micro-batch (see module docstring)."""
    if not seqs:
        raise ValueError("pack needs at least one sequence")
    ids, pos_ids, tgt, sid, rows, cols, pos = [], [], [], [], [], [], []
    offset = 0
    for i in seqs:
        p, r = prompts[i], responses[i]
        if not p or not r:
            raise ValueError(f"sequence {i} has an empty prompt ({len(p)}) or response ({len(r)})")
        x = list(p) + list(r[:-1])
        L, P = len(x), len(p)
        ids += x
        pos_ids += range(L)
        tgt += [IGNORE_INDEX] * (P - 1) + list(r)
        sid += [-1] * (P - 1) + [i] * len(r)
        rows += [i] * len(r)
        cols += range(len(r))
        pos += range(offset + P - 1, offset + L)
        offset += L
    long = dict(dtype=torch.long, device=device)
    targets = torch.tensor(tgt, **long)
    return PackedMicroBatch(
        input_ids=torch.tensor(ids, **long)[None],
        position_ids=torch.tensor(pos_ids, **long)[None],
        targets=targets,
        seq_ids=torch.tensor(sid, **long),
        response_mask=targets != IGNORE_INDEX,
        seqs=list(seqs),
        rows=torch.tensor(rows, **long),
        cols=torch.tensor(cols, **long),
        pos=torch.tensor(pos, **long),
        filler=filler,
    )


def split_across_ranks(lengths: list[int], seqs: list[int], world_size: int) -> list[list[int]]:
    """Longest-first greedy split of `seqs` over ranks by token count (deterministic; ties go to the lower rank)."""
    load = [0] * world_size
    share: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(seqs, key=lambda s: (-lengths[s], s)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        share[r].append(i)
        load[r] += lengths[i]
    return [sorted(s) for s in share]


def bin_by_budget(lengths: list[int], seqs: list[int], token_budget: int) -> list[list[int]]:
    """First-fit-decreasing bins of at most `token_budget` tokens; a longer sequence raises ValueError."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(seqs, key=lambda s: (-lengths[s], s)):
        if lengths[i] > token_budget:
            raise ValueError(
                f"sequence {i} has {lengths[i]} tokens, over the micro-batch budget of {token_budget}"
            )
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(token_budget - lengths[i])
    return [sorted(b) for b in bins]


def plan_micro_batches(
    lengths: list[int], seqs: list[int], *, token_budget: int, world_size: int = 1
) -> list[list[list[int]]]:
    """plan[rank][j] = batch indices of rank's j-th micro-batch; all ranks get the same count (maybe empty lists)."""
    plan = [
        bin_by_budget(lengths, share, token_budget) for share in split_across_ranks(lengths, seqs, world_size)
    ]
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
    device: torch.device | str = "cpu",
) -> list[PackedMicroBatch]:
    """This rank's packed micro-batches over batch indices `seqs`; empty slots become filler micro-batches."""
    lengths = sequence_lengths(prompts, responses)
    plan = plan_micro_batches(lengths, seqs, token_budget=token_budget, world_size=world_size)
    shortest = min(seqs, key=lambda s: (lengths[s], s))
    return [
        pack(prompts, responses, mb, device=device)
        if mb
        else pack(prompts, responses, [shortest], device=device, filler=True)
        for mb in plan[rank]
    ]
