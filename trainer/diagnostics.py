"""PRIME diagnostics the trainer logs each iteration (prime.md "Diagnostics worth logging").

Plain reductions to `dict[str, float]` with "section/name" keys, so the trainer can merge them into one log
line. The PRM's diagnostics (pairwise accuracy, process rewards by outcome) live in prm.py, the advantage
stats in `Advantages.stats`, the policy update's in policy.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastprime.trainer.batch import Batch
from fastprime.trainer.masked_ops import (
    check_group_size,
    check_mask,
    check_vector,
)


def response_stats(mask: Tensor, *, truncated: Tensor | None = None) -> dict[str, float]:
    """Response length (valid tokens per row, EOS included) and truncation rate.

    Args:
        mask: [n, T] bool/0-1 valid response tokens (rows may be empty here).
        truncated: [n] bool, True where the response hit the length limit; adds "response/truncation_rate".

    Returns:
        {"response/length_mean", "response/length_min", "response/length_max"[, "response/truncation_rate"]}.
    """
    mask = check_mask(mask, nonempty_rows=False)
    lengths = mask.sum(dim=1).double()
    stats = {
        "response/length_mean": float(lengths.mean()),
        "response/length_min": float(lengths.min()),
        "response/length_max": float(lengths.max()),
    }
    if truncated is not None:
        if not isinstance(truncated, Tensor) or truncated.shape != (mask.shape[0],):
            got = tuple(truncated.shape) if isinstance(truncated, Tensor) else type(truncated).__name__
            raise ValueError(f"truncated has shape {got}, expected ({mask.shape[0]},)")
        stats["response/truncation_rate"] = float(truncated.double().mean())
    return stats


def outcome_stats(acc: Tensor, *, k: int) -> dict[str, float]:
    """Outcome scores: the mean, and how many groups carry no leave-one-out signal (all scores equal).

    Args:
        acc: [n] outcome scores, groups of k contiguous.
        k: samples per prompt.

    Returns:
        {"outcome/acc_mean", "outcome/solve_all_rate" (groups all 1), "outcome/solve_none_rate" (groups all 0),
        "outcome/equal_group_rate" (groups whose k scores are all equal, soft scores included)}.
    """
    check_vector(acc, "acc")
    check_group_size(acc.shape[0], k)
    groups = acc.double().view(-1, k)
    return {
        "outcome/acc_mean": float(groups.mean()),
        "outcome/solve_all_rate": float((groups == 1).all(dim=1).double().mean()),
        "outcome/solve_none_rate": float((groups == 0).all(dim=1).double().mean()),
        "outcome/equal_group_rate": float((groups == groups[:, :1]).all(dim=1).double().mean()),
    }


def batch_stats(batch: Batch) -> dict[str, float]:
    """What the update trains on, after the filter: responses, tokens, kept accuracy, lengths ("batch/...")."""
    stats = {"batch/responses": batch.n, "batch/tokens": batch.num_tokens}
    stats["outcome/acc_kept_mean"] = float(batch.acc.mean())
    stats.update({f"batch/{k}": v for k, v in response_stats(batch.mask, truncated=batch.truncated).items()})
    return stats


__all__ = ["response_stats", "outcome_stats", "batch_stats"]


def engine_agreement_stats(sample_logprobs: list[list[float] | None] | None, old: Tensor) -> dict[str, float]:
    """|engine sampling log-prob - trainer's old log-prob| over the tokens the engine reported (verl logs the same).

    A stale weight sync or a sampling mismatch (temperature, EOS, tokenisation) shows up at once as a large
    difference; agreeing engines differ only by kernel rounding.

    Args:
        sample_logprobs: [n] per-response lists of the engine's log-probs (None for a response without them).
        old: [n, T] the trainer's log-probs of the same tokens (0 on padding).

    Returns:
        {"rollout/logprob_diff_max", "rollout/logprob_diff_mean"}, or {} when no response carries log-probs.
    """
    if sample_logprobs is None:
        return {}
    diffs = []
    for i, lps in enumerate(sample_logprobs):
        if lps is None:
            continue
        engine = torch.tensor(lps, dtype=torch.float64)
        diffs.append((engine - old[i, : len(lps)].detach().double().cpu()).abs())
    if not diffs:
        return {}
    d = torch.cat(diffs)
    return {"rollout/logprob_diff_max": float(d.max()), "rollout/logprob_diff_mean": float(d.mean())}
