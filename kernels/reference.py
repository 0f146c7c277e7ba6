"""The specification of the three fused ops in eager PyTorch: each materialises the [N, V] logits in fp32
(fp64 for fp64 inputs, so that `gradcheck` can run) and lets autograd differentiate.

Tests use these as the oracle's twin, benchmarks as a baseline, and `impl="reference"` runs them. The fast
paths (chunked.py, triton_core.py with the epilogues of ppo_loss.py and prm_loss.py) must equal them.

Log-probs (T = temperature):
    z = (h W^T + b) / T      logp_t = log_softmax(z)[target]      H = -sum_j p_j log p_j
PPO (per valid token, d = clamp(logp - old_logp, -20, 20), r = e^d, advantage A, weights w):
    pg_t = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), with dual clip c: for A < 0 min(pg_t, -c A)
    kl_t = e^u - u - 1, u = clamp(ref_logp - logp, -20, 20)
    L = sum_t w_t (pg_t + kl_coef kl_t - entropy_coef H_t)
PRM (q_t = logp_t - ref_logp_t on tokens of sequence s):
    score_s = beta sum_{t in s} q_t      L = (1/n) sum_{s present} BCE_with_logits(score_s, y_s)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastprime.kernels.checks import IGNORE_INDEX

LOG_RATIO_CLAMP = 20.0  # verl clamps log-ratios the same way, so that exp cannot overflow
CLIP_NONE, CLIP_LOW, CLIP_HIGH, CLIP_DUAL = 0, 1, 2, 3


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits are kept in fp32 (fp64 for fp64 inputs, used by gradcheck), whatever the input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_logprobs_reference(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """Eager reference. hidden [..., D], weight [V, D], targets [...], bias [V] -> (logp [...], entropy [...]).

    Exactly `z = (hidden.float() @ weight.float().T + bias) / temperature`,
    `logp = log_softmax(z)[target]`, `entropy = -(softmax(z) * log_softmax(z)).sum(-1)`, both fp32 and 0
    where `targets == ignore_index`. Materialises the [..., V] logits; differentiable by autograd.
    """
    dt = compute_dtype(hidden.dtype)
    z = hidden.to(dt) @ weight.to(dt).T
    if bias is not None:
        z = z + bias.to(dt)
    z = z / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, 0)
    logp = logprobs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    zero = torch.zeros((), dtype=dt, device=hidden.device)
    return torch.where(keep, logp, zero), torch.where(keep, entropy, zero)


@dataclass(frozen=True)
class PPOOptions:
    """The scalar settings of the PPO loss (see `linear_ppo_loss`)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    ignore_index: int = IGNORE_INDEX


class PPOStats(NamedTuple):
    """Detached diagnostics; scalars are 0-dim fp32 tensors averaged over the loss tokens (w != 0, not ignored)."""

    logp: Tensor  # per-token log-probs, shaped like targets (0 at ignored targets)
    clip_frac_low: Tensor  # A < 0 and ratio < 1 - clip_low: the clipped branch is active (no gradient)
    clip_frac_high: Tensor  # A > 0 and ratio > 1 + clip_high
    dual_clip_frac: Tensor  # A < 0 and the dual-clip bound -c A is active
    approx_kl: Tensor  # mean(old_logp - logp), verl's `ppo_kl`
    entropy: Tensor  # mean entropy of the tempered distribution
    ratio: Tensor  # mean ratio
    kl_ref: Tensor  # mean k3 KL to ref_logp (0 without ref_logp)


def ppo_terms(
    logp: Tensor,
    entropy: Tensor | None,
    old_logp: Tensor,
    advantages: Tensor,
    ref_logp: Tensor | None,
    valid: Tensor,
    opts: PPOOptions,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The module docstring's per-token PPO formula (differentiable through logp and entropy).

    All [N] -> (term, ratio, k3 kl, clip code, d = logp - old_logp, u = ref_logp - logp), 0 at invalid tokens;
    the entropy bonus is left out when entropy is None, the KL term when ref_logp is None.
    """
    dt = logp.dtype  # fp32, or fp64 when the core ran on fp64 inputs (gradcheck)
    zero = torch.zeros((), dtype=dt, device=logp.device)
    adv = torch.where(valid, advantages.to(dt), zero)
    d = torch.where(valid, logp - old_logp.to(dt), zero)
    ratio = torch.exp(d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - opts.clip_low, 1.0 + opts.clip_high)
    pg = torch.maximum(pg1, pg2)
    code = torch.where(pg2 > pg1, torch.where(adv < 0, CLIP_LOW, CLIP_HIGH), CLIP_NONE)
    if opts.dual_clip is not None:
        pg3 = -adv * opts.dual_clip
        dual = (adv < 0) & (pg > pg3)
        pg = torch.where(dual, pg3, pg)
        code = torch.where(dual, CLIP_DUAL, code)
    term, kl, u = pg, torch.zeros_like(pg), torch.zeros_like(pg)
    if ref_logp is not None:
        u = torch.where(valid, ref_logp.to(dt) - logp, zero)
        u_c = u.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.exp(u_c) - u_c - 1.0
        term = term + opts.kl_coef * kl
    if entropy is not None:
        term = term - opts.entropy_coef * entropy
    return term, torch.where(valid, ratio, zero), kl, code, d, u


def ppo_stats(logp, entropy, ratio, kl, code, old_logp, w, targets, ignore_index) -> PPOStats:
    """All [N] -> `PPOStats` averaged over the loss tokens (not ignored, w != 0)."""
    loss_tok = ((targets != ignore_index) & (w != 0)).float()
    n = loss_tok.sum().clamp(min=1.0)
    mean = lambda x: (torch.where(loss_tok > 0, x.float(), 0.0)).sum() / n
    return PPOStats(
        logp=logp,
        clip_frac_low=mean(code == CLIP_LOW),
        clip_frac_high=mean(code == CLIP_HIGH),
        dual_clip_frac=mean(code == CLIP_DUAL),
        approx_kl=mean(old_logp.float() - logp),
        entropy=mean(entropy),
        ratio=mean(ratio),
        kl_ref=mean(kl),
    )


def linear_ppo_loss_reference(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    w: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    temperature: float = 1.0,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, PPOStats]:
    """Eager fp32 specification of `linear_ppo_loss` (materialises the [N, V] logits; torch autograd).

    Shapes as in `linear_ppo_loss`, already flattened: hidden [N, D], weight [V, D], per-token tensors [N].
    """
    logp, entropy = linear_logprobs_reference(
        hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index
    )
    if old_logp is None:  # on-policy: the behaviour policy is this one, old_logp = logp without gradient
        old_logp = logp.detach()
    opts = PPOOptions(clip_low, clip_high, dual_clip, kl_coef, entropy_coef, ignore_index)
    valid = targets != ignore_index
    term, ratio, kl, code, _, _ = ppo_terms(logp, entropy, old_logp, advantages, ref_logp, valid, opts)
    loss = (torch.where(valid, w.to(logp.dtype), 0.0) * term).sum()
    stats = ppo_stats(
        logp.detach(), entropy.detach(), ratio.detach(), kl.detach(), code, old_logp, w, targets, ignore_index
    )
    return loss, stats


def linear_prm_loss_reference(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ref_logp: Tensor,
    seq_ids: Tensor,
    labels: Tensor,
    *,
    beta: float = 0.05,
    temperature: float = 1.0,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    num_seqs: int | float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Eager fp32 specification of `linear_prm_loss` (materialises the [N, V] logits; torch autograd).

    hidden [N, D], weight [V, D], targets / ref_logp / seq_ids [N], labels [S] -> (loss 0-dim, q [N] detached).
    """
    logp, _ = linear_logprobs_reference(
        hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index
    )
    dt = logp.dtype
    member = (targets != ignore_index) & (seq_ids >= 0)
    q = torch.where(member, logp - ref_logp.to(dt), 0.0)
    S = labels.shape[0]
    onehot = (seq_ids.unsqueeze(0) == torch.arange(S, device=seq_ids.device).unsqueeze(1)) & member  # [S, N]
    score = beta * (onehot.to(dt) * q).sum(-1)
    present = onehot.any(-1)
    n = present.sum().clamp(min=1) if num_seqs is None else num_seqs
    bce = F.binary_cross_entropy_with_logits(score, labels.to(dt), reduction="none")
    return torch.where(present, bce, 0.0).sum() / n, q.detach()
