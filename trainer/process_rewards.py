"""Implicit-PRM token rewards from the log-ratio q (prime.md step 5) and the PRM pairwise-accuracy diagnostic.

`q[i, t] = logp_prm[i, t] - logp_ref[i, t]` on the sampled tokens. The reference code (PRIME-RL/PRIME and verl's
`recipe/prime`, `prime_norm` and `prime_granularity`) turns q into rewards without the factor beta: the
batch normalisation below removes any constant scale anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastprime.trainer.masked_ops import (
    check_group_size,
    check_mask,
    check_token_tensor,
    check_vector,
    float_dtype,
    place_on_last_token,
    reverse_discounted_cumsum,
)

GRANULARITIES = ("token", "whole")
NORMS = ("batch_norm", "none")


def process_token_rewards(
    q: Tensor,
    mask: Tensor,
    *,
    granularity: str = "token",
    norm: str = "batch_norm",
) -> Tensor:
    """Per-token process rewards r [n, T] from the implicit-PRM log-ratio q [n, T].

    Args:
        q: [n, T] log-ratio `logp_prm - logp_ref` (padding may hold anything, NaN included).
        mask: [n, T] bool/0-1, valid response tokens (EOS included); every row needs one.
        granularity: "token": r = q on every valid token; "whole": sum_t q on the last valid token.
        norm: "batch_norm": divide all of r by `max_{i,t} |sum_{s>=t} r[i, s]| + 1e-6` (the largest absolute
            process return-to-go among the rows given, so process returns lie in [-1, 1]); "none".

    The maximum is over the rows passed in: call it once on the iteration's whole batch (the reference code
    normalises after its PRM pass over all of a rank's data), not once per mini-batch.

    Returns:
        r: [n, T] in fp32 (fp64 if q is fp64), exactly 0 outside the mask. PyTorch equivalent:
        `r = q * mask; r = r / (r.flip(-1).cumsum(-1).flip(-1).abs().max() + 1e-6)` for token/batch_norm.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity = {granularity!r}, expected one of {GRANULARITIES}")
    if norm not in NORMS:
        raise ValueError(f"norm = {norm!r}, expected one of {NORMS}")
    mask = check_mask(mask)
    check_token_tensor(q, mask, "q")
    dtype = float_dtype(q)
    r = torch.where(mask, q.to(dtype), 0)
    if granularity == "whole":
        r = place_on_last_token(r.sum(dim=1), mask, dtype)
    if norm == "batch_norm":
        r = r / (reverse_discounted_cumsum(r, mask).abs().max() + 1e-6)
    return r


def prm_pairwise_accuracy(seq_q_sum: Tensor, acc: Tensor, *, k: int) -> float | None:
    """How often the PRM ranks two responses to the same prompt like the verifier does.

    For each group and each pair (i, j) with acc_i != acc_j: correct when sign(s_i - s_j) == sign(acc_i - acc_j)
    with s = seq_q_sum; a tie in s counts as wrong. A group's accuracy is the |acc_i - acc_j|-weighted mean
    over its pairs (so soft code scores 1.0 vs 0.9 weigh less than 1 vs 0); the result is the mean over groups
    that have at least one such pair.

    This follows the reference code's `compute_dpo_accuracy` (verl recipe/prime/prime_core_algos.py) except for
    two edge cases, chosen so that the number means "fraction ranked right": the reference scores a group
    without a pair as 0.5 and averages it in (we leave it out), and it counts a score tie as right when
    acc_i < acc_j (we count every tie as wrong).

    Args:
        seq_q_sum: [n] per-response sum over valid tokens of q (the implicit reward before beta).
        acc: [n] outcome scores, groups of k contiguous.
        k: samples per prompt.

    Returns:
        accuracy in [0, 1], or None when no group has two responses with different scores.
    """
    check_vector(acc, "acc")
    check_vector(seq_q_sum, "seq_q_sum", acc.shape[0])
    check_group_size(acc.shape[0], k, min_k=2)
    s = seq_q_sum.double().view(-1, k)
    a = acc.double().view(-1, k)
    ds = s.unsqueeze(2) - s.unsqueeze(1)  # [G, k, k]: s_i - s_j
    da = a.unsqueeze(2) - a.unsqueeze(1)
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=s.device), diagonal=1)
    weight = da.abs() * upper  # each unordered pair once
    right = (torch.sign(ds) == torch.sign(da)) & (da != 0)
    group_weight = weight.sum(dim=(1, 2))
    has_pair = group_weight > 0
    if not has_pair.any():
        return None
    group_acc = (weight * right).sum(dim=(1, 2))[has_pair] / group_weight[has_pair]
    return float(group_acc.mean())


__all__ = ["process_token_rewards", "prm_pairwise_accuracy", "GRANULARITIES", "NORMS"]
