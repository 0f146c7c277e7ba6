"""Advantages from two reward sources, outcome (verifier score) and process (implicit PRM), prime.md step 6.

Every estimator works on [n, T] response tokens, n = B * K responses grouped contiguously by prompt:
    1. a per-source token reward x[i, t] with the estimator's baseline already subtracted,
    2. per-source returns G[i, t] = sum_{s >= t} gamma^(s - t) x[i, s],
    3. returns = outcome_coef * G_outcome + process_coef * G_process,
    4. advantages = masked_whiten(returns) over all valid tokens of the batch (switch `whiten`).
The estimators differ only in step 1 (see `compute_advantages`). This is the reference code's order:
PRIME's `compute_rloo_advantage_return` sums the coefficient-weighted per-source RLOO rewards, takes one
reverse cumsum (gamma = 1) and whitens; by linearity that equals summing per-source returns.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastprime.trainer.batch import Batch
from fastprime.trainer.config import AlgorithmConfig
from fastprime.trainer.masked_ops import (
    check_group_size,
    check_mask,
    check_token_tensor,
    check_vector,
    float_dtype,
    masked_mean_per_row,
    masked_whiten,
    place_on_last_token,
    reverse_discounted_cumsum,
)

ESTIMATORS = ("rloo", "grpo", "reinforce")
PROCESS_LOO = ("reference", "paper")
GRPO_EPS = 1e-6  # verl's compute_grpo_outcome_advantage: (score - mean) / (std + 1e-6), unbiased std


class Advantages(NamedTuple):
    """Output of `compute_advantages`. All tensors [n, T], exactly 0 outside the mask."""

    advantages: Tensor  # what the PPO loss multiplies: whitened returns (or the returns with whiten=False)
    returns: Tensor  # outcome_coef * outcome_returns + process_coef * process_returns, before whitening
    outcome_returns: Tensor  # G of the outcome source after its baseline, before its coefficient
    process_returns: Tensor | None  # G of the process source, None when it is off (no rewards or coef 0)
    stats: dict[str, float]  # scalars for logging, see `_stats`


def _outcome_token_rewards(acc: Tensor, mask: Tensor, k: int, estimator: str, dtype: torch.dtype) -> Tensor:
    """Outcome rewards [n, T] with the baseline subtracted (rloo, grpo: on the last valid token)."""
    a = acc.to(dtype).view(-1, k)
    if estimator == "rloo":
        # a_i - mean_{j != i} a_j, written as the reference code does it: a_i K/(K-1) - sum_j a_j/(K-1)
        x = a * (k / (k - 1)) - a.sum(dim=1, keepdim=True) / (k - 1)
    else:  # grpo
        x = (a - a.mean(dim=1, keepdim=True)) / (a.std(dim=1, keepdim=True) + GRPO_EPS)
    return place_on_last_token(x.reshape(-1), mask, dtype)


def _process_token_rewards_with_baseline(
    r: Tensor, mask: Tensor, k: int, estimator: str, process_loo: str
) -> Tensor:
    """Process rewards [n, T] with the estimator's group baseline subtracted on every valid token."""
    n, t = r.shape
    if estimator == "rloo":
        mu = masked_mean_per_row(r, mask).view(-1, k, 1)  # mu_j = mean_t r[j, t] over valid tokens
        rg = r.view(-1, k, t)
        if process_loo == "reference":
            # r'[i,t] = K/(K-1) r[i,t] - sum_{j in group} mu_j / (K-1)   (PRIME's masked_rloo)
            x = rg * (k / (k - 1)) - mu.sum(dim=1, keepdim=True) / (k - 1)
        else:
            # paper Eq. 5: r'[i,t] = r[i,t] - mean_{j != i} mu_j
            x = rg - (mu.sum(dim=1, keepdim=True) - mu) / (k - 1)
        x = x.reshape(n, t)
    else:  # grpo
        # (r[i,t] - m_g) / (s_g + 1e-6), m_g and unbiased s_g over all valid tokens of the group's K
        # responses. Token-pooled (not over the per-response means mu_j) so that a group whose token rewards
        # are all equal gets exactly 0 instead of (r - mu) / 1e-6.
        mg = mask.view(-1, k * t)
        rg = torch.where(mg, r.view(-1, k * t), 0)
        cnt = mg.sum(dim=1, keepdim=True)
        mean = rg.sum(dim=1, keepdim=True) / cnt
        var = torch.where(mg, rg - mean, 0).pow(2).sum(dim=1, keepdim=True) / (cnt - 1).clamp(min=1)
        x = ((rg - mean) / (var.sqrt() + GRPO_EPS)).reshape(n, t)
    return torch.where(mask, x, 0)


def compute_advantages(
    acc: Tensor,
    process_rewards: Tensor | None,
    mask: Tensor,
    *,
    k: int,
    estimator: str = "rloo",
    outcome_coef: float = 1.0,
    process_coef: float = 1.0,
    gamma: float = 1.0,
    whiten: bool = True,
    process_loo: str = "reference",
) -> Advantages:
    """Advantages [n, T] for the PPO loss from outcome scores and implicit-PRM token rewards.

    Args:
        acc: [n] outcome scores, n = B * k, groups of k contiguous.
        process_rewards: [n, T] token rewards r from `process_token_rewards`, or None (outcome only).
        mask: [n, T] bool/0-1 valid response tokens, right-padded, EOS included; every row non-empty.
        k: samples per prompt (>= 2 for rloo and grpo).
        estimator: per-source token rewards x (then G = reverse gamma-discounted cumsum of x):
            "rloo": outcome `acc_i - mean_{j != i} acc_j` on the last valid token; process by `process_loo`:
                "reference" `K/(K-1) r[i,t] - sum_j mu_j/(K-1)`, "paper" (Eq. 5) `r[i,t] - mean_{j != i} mu_j`,
                mu_j = mean of r[j] over its valid tokens, j within the prompt's group.
            "grpo": outcome `(acc_i - mean_g) / (std_g + 1e-6)` on the last token (unbiased std over the k
                scores); process `(r[i,t] - m_g) / (s_g + 1e-6)`, m_g, s_g the mean and unbiased std of all
                valid token rewards of the group.
            "reinforce": no baseline, prime.md literally: `A_t = acc_i + sum_{s>=t} gamma^(s-t) r[i,s]`, so
                the outcome return is acc_i on every valid token, undiscounted even for gamma < 1.
        outcome_coef, process_coef: source weights; process_coef = 0 (or process_rewards None) gives the
            outcome-only baseline, computed without touching the process rewards.
        gamma: discount in (0, 1].
        whiten: whiten the summed returns over all valid tokens (unbiased variance, mean left at 0, like
            the reference code); off gives advantages = returns.
        process_loo: "reference" or "paper", see rloo above (ignored by other estimators).

    Returns:
        Advantages(advantages, returns, outcome_returns, process_returns, stats).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator = {estimator!r}, expected one of {ESTIMATORS}")
    if process_loo not in PROCESS_LOO:
        raise ValueError(f"process_loo = {process_loo!r}, expected one of {PROCESS_LOO}")
    if not (0.0 < gamma <= 1.0):
        raise ValueError(f"gamma = {gamma} must lie in (0, 1]")
    for name, c in (("outcome_coef", outcome_coef), ("process_coef", process_coef)):
        if not math.isfinite(c):
            raise ValueError(f"{name} = {c} is not finite")
    check_vector(acc, "acc")
    check_group_size(acc.shape[0], k, min_k=1 if estimator == "reinforce" else 2)
    mask = check_mask(mask)
    if mask.shape[0] != acc.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} rows but acc has {acc.shape[0]} entries")
    use_process = process_rewards is not None and process_coef != 0
    if process_rewards is not None:
        check_token_tensor(process_rewards, mask, "process_rewards")
    dtype = float_dtype(process_rewards) if process_rewards is not None else float_dtype(acc)

    if estimator == "reinforce":
        outcome_returns = torch.where(mask, acc.to(dtype).unsqueeze(1), 0).to(dtype)
    else:
        x_o = _outcome_token_rewards(acc, mask, k, estimator, dtype)
        outcome_returns = reverse_discounted_cumsum(x_o, mask, gamma=gamma)
    returns = outcome_coef * outcome_returns

    process_returns = None
    if use_process:
        r = torch.where(mask, process_rewards.to(dtype), 0)
        if estimator != "reinforce":
            r = _process_token_rewards_with_baseline(r, mask, k, estimator, process_loo)
        process_returns = reverse_discounted_cumsum(r, mask, gamma=gamma)
        returns = returns + process_coef * process_returns

    advantages = masked_whiten(returns, mask) if whiten else returns
    stats = _stats(advantages, returns, outcome_returns, process_returns, mask)
    return Advantages(advantages, returns, outcome_returns, process_returns, stats)


def _stats(
    advantages: Tensor, returns: Tensor, outcome_returns: Tensor, process_returns: Tensor | None, mask: Tensor
) -> dict[str, float]:
    """Token means over valid tokens of each source's returns, and the spread of the advantages."""
    count = mask.sum()
    valid_adv = advantages[mask]
    stats = {
        "advantages/mean": float(valid_adv.mean()),
        "advantages/std": float(valid_adv.std()) if valid_adv.numel() > 1 else 0.0,
        "advantages/min": float(valid_adv.min()),
        "advantages/max": float(valid_adv.max()),
        "returns/mean": float(returns.sum() / count),
        "returns/outcome_mean": float(outcome_returns.sum() / count),
    }
    if process_returns is not None:
        stats["returns/process_mean"] = float(process_returns.sum() / count)
        stats["returns/process_abs_mean"] = float(process_returns.abs().sum() / count)
    return stats


def advantage_phase(
    batch: Batch, rewards: Tensor | None, device: torch.device, *, config: AlgorithmConfig
) -> tuple[Advantages, dict[str, float]]:
    """prime.md step 6: the batch's advantages from its outcome scores and the PRM's token rewards (or None)."""
    c = config
    adv = compute_advantages(
        batch.acc.to(device), rewards, batch.mask.to(device), k=batch.k, estimator=c.estimator,
        outcome_coef=c.outcome_coef, process_coef=c.process_coef, gamma=c.gamma, whiten=c.whiten,
        process_loo=c.process_loo,
    )  # fmt: skip
    return adv, adv.stats


__all__ = ["Advantages", "advantage_phase", "compute_advantages", "ESTIMATORS", "PROCESS_LOO"]
