"""PRIME's group-accuracy filter (prime.md step 3) and the buffer that carries surplus groups to the next step.

A group is the K responses to one prompt, contiguous in the batch. A group is kept when its mean outcome score
lies in [lo, hi] (inclusive): all-wrong and all-right groups carry no leave-one-out signal. The trainer keeps
sampling prompts until B groups pass; the prompts of groups that passed beyond B wait in a `RefillBuffer` and are
sampled again first next iteration (their responses are dropped: the next policy samples them afresh, as the
reference code does, so no stale response is ever trained on).
"""

from __future__ import annotations

import copy
import math
from collections import deque
from typing import Any

from torch import Tensor

from fastprime.trainer.masked_ops import check_group_size, check_vector

# Group means are sums of a few fractions (e.g. 3/5 = 0.6 must pass hi = 0.6 although float32 rounds it up);
# this tolerance makes the inclusive bounds hold for every mean that equals a bound up to rounding.
_BOUND_TOL = 1e-6


def group_filter_mask(
    acc: Tensor,
    *,
    k: int,
    lo: float = 0.2,
    hi: float = 0.8,
    truncated: Tensor | None = None,
    drop_truncated: bool = False,
) -> Tensor:
    """Which groups to keep: `lo <= mean_k acc <= hi` (inclusive), and no truncated response if asked.

    Args:
        acc: [n] outcome scores in [0, 1], n = B * K, groups contiguous.
        k: samples per prompt (K).
        lo, hi: inclusive bounds on the group mean (tolerance 1e-6 for rounding).
        truncated: [n] bool, True where the response hit the length limit (no EOS).
        drop_truncated: also drop every group that holds a truncated response (needs `truncated`).

    Returns:
        keep: [n // k] bool, one entry per group. Equivalent to
        `(lo <= acc.view(-1, k).mean(1) <= hi) & ~truncated.view(-1, k).any(1)`.
    """
    check_vector(acc, "acc")
    check_group_size(acc.shape[0], k)
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"filter bounds must satisfy 0 <= lo <= hi <= 1, got lo = {lo}, hi = {hi}")
    mean = acc.double().view(-1, k).mean(dim=1)
    keep = (mean >= lo - _BOUND_TOL) & (mean <= hi + _BOUND_TOL)
    if drop_truncated:
        if truncated is None:
            raise ValueError("drop_truncated = True needs the `truncated` [n] bool tensor")
        if not isinstance(truncated, Tensor) or truncated.shape != acc.shape:
            got = tuple(truncated.shape) if isinstance(truncated, Tensor) else type(truncated).__name__
            raise ValueError(f"truncated has shape {got}, expected {tuple(acc.shape)}")
        keep &= ~truncated.bool().view(-1, k).any(dim=1)
    return keep


def prompts_to_sample(need: int, pass_rate: float | None, *, most: int) -> int:
    """How many prompts one rollout round samples so that `need` more groups pass the filter.

    need / pass_rate plus one binomial standard deviation (sqrt(need * (1 - pass_rate)) more passing groups):
    the round yields enough about 5 times in 6. A round of fewer prompts is no bargain: every round is a whole
    decode loop, and a small batch decodes at nearly the cost of a large one (3 rounds of 32 demo prompts took
    1.36 s on a CPU, one round of 96 took 1.00 s). Surplus passed prompts wait in the `RefillBuffer`.

    pass_rate: the fraction of groups that passed so far (None before any round: `need`); `most` caps the
    result (at least `need`, whatever the rate: 0 gives `most`).
    """
    if not 0 < need <= most:
        raise ValueError(f"need = {need} must lie in [1, most = {most}]")
    if pass_rate is not None and not 0.0 <= pass_rate <= 1.0:
        raise ValueError(f"pass_rate = {pass_rate} must lie in [0, 1]")
    if pass_rate is None or pass_rate == 1.0:
        return need
    if pass_rate == 0.0:
        return most
    # - 1e-9: a quotient that is whole up to rounding must not cost a whole extra prompt
    wanted = math.ceil((need + math.sqrt(need * (1.0 - pass_rate))) / pass_rate - 1e-9)
    return max(need, min(wanted, most))


class RefillBuffer:
    """First-in first-out store of prompts (indices) whose groups passed the filter beyond the batch size.

    `take` returns the oldest first, so no passed prompt waits more than necessary. An item already queued is
    not queued twice (a prompt passed again in a later epoch is one prompt to resample, not two).

    Typical use per iteration::

        idx = buffer.take(B)                          # sampled again, first, in the first round
        while len(groups) < B:
            passed = sample_and_filter(idx + fresh)   # groups that passed
            need = B - len(groups)
            groups += passed[:need]
            buffer.add([g.prompt for g in passed[need:]])
    """

    def __init__(self) -> None:
        self._groups: deque[Any] = deque()

    def add(self, groups: list) -> None:
        """Append items (oldest first in `groups`) at the back of the queue, skipping any already queued."""
        for g in groups:
            if g not in self._groups:
                self._groups.append(g)

    def take(self, batch_size: int) -> list:
        """Remove and return up to `batch_size` of the oldest groups (fewer if the buffer holds fewer)."""
        if not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size = {batch_size!r} must be an integer >= 0")
        count = min(batch_size, len(self._groups))
        return [self._groups.popleft() for _ in range(count)]

    def __len__(self) -> int:
        return len(self._groups)

    def state_dict(self) -> dict:
        """Checkpointable state: a deep copy of the queued groups (oldest first)."""
        return {"groups": copy.deepcopy(list(self._groups))}

    def load_state_dict(self, d: dict) -> None:
        """Restore the state saved by `state_dict` (replaces the current content)."""
        if not isinstance(d, dict) or "groups" not in d:
            raise ValueError(f"not a RefillBuffer state dict: {type(d).__name__} without 'groups'")
        self._groups = deque(copy.deepcopy(list(d["groups"])))


__all__ = ["group_filter_mask", "prompts_to_sample", "RefillBuffer"]
