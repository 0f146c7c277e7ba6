"""PRIME's implicit PRM, prime.md step 5: the PRM pass, its update orders, token rewards and diagnostics.

`q[i, t] = logp_prm[i, t] - logp_ref[i, t]` on the sampled tokens; the PRM is trained with
`BCE(sigmoid(beta * sum_t q), acc)` on the outcome labels. `prm.update` orders forward and update:
'after' (each mini-batch's q comes from the forward whose loss then steps the optimizer), 'before' (update on
every mini-batch first, then a no-grad forward for q) or 'none' (a frozen PRM). The reference code (PRIME-RL/PRIME
and verl's `recipe/prime`, `prime_norm` and `prime_granularity`) turns q into rewards without the factor beta:
the batch normalisation removes any constant scale anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from fastprime.kernels import linear_prm_loss
from fastprime.trainer.batch import Batch
from fastprime.trainer.config import PRMConfig
from fastprime.trainer.flops import TRAIN_FACTOR
from fastprime.trainer.masked_ops import (
    check_group_size,
    check_mask,
    check_token_tensor,
    check_vector,
    float_dtype,
    place_on_last_token,
    reverse_discounted_cumsum,
)
from fastprime.trainer.passes import (
    Dist,
    all_sum,
    chunks,
    clip_and_step,
    micro_batches,
    own_flops,
    padded,
    reshard_after_no_grad,
)

# batch_norm's smallest divisor. A PRM equal to the reference gives q = 0 exactly (same packing), but float
# noise from anywhere else (one fp32 log-prob rounds at ~2.4e-7 for logits of order 10; summed over a 3072-token
# response that is at most ~7e-4 in a return) must not be scaled up to returns of order 1. 1e-3 sits above
# that worst case while a PRM that has learned anything has returns far above it (its loss needs
# beta * sum_t q of order 1, i.e. |sum_t q| ~ 1/beta = 20 at the default beta); below the floor, returns keep
# their sign and relative size and just stay small.
NORM_FLOOR = 1e-3
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
        norm: "batch_norm": divide all of r by `max(max_{i,t} |sum_{s>=t} r[i, s]| + 1e-6, NORM_FLOOR)` (the
            largest absolute process return-to-go among the rows given, so process returns lie in [-1, 1];
            the floor keeps float noise near 0, see NORM_FLOOR); "none".

    The maximum is over the rows passed in: call it once on the iteration's whole batch (the reference code
    normalises after its PRM pass over all of a rank's data), not once per mini-batch.

    Returns:
        r: [n, T] in fp32 (fp64 if q is fp64), exactly 0 outside the mask. PyTorch equivalent:
        `r = q * mask; r = r / max(r.flip(-1).cumsum(-1).flip(-1).abs().max() + 1e-6, 1e-3)` for token/batch_norm.
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
        r = r / (reverse_discounted_cumsum(r, mask).abs().max() + 1e-6).clamp(min=NORM_FLOOR)
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


def process_reward_stats(rewards: Tensor, mask: Tensor, acc: Tensor) -> dict[str, float]:
    """Process rewards by outcome: does the implicit PRM give correct responses more reward than wrong ones?

    Args:
        rewards: [n, T] process token rewards (or the raw log-ratio q); padding ignored.
        mask: [n, T] bool/0-1 valid tokens, every row non-empty.
        acc: [n] outcome scores; a response counts as correct when acc >= 0.5.

    Returns:
        {"process/token_mean", "process/seq_sum_mean", "process/seq_sum_correct_mean",
        "process/seq_sum_wrong_mean"}; a correct/wrong key is left out when no response falls in that class.
    """
    mask = check_mask(mask)
    check_token_tensor(rewards, mask, "rewards")
    check_vector(acc, "acc", mask.shape[0])
    r = rewards.to(float_dtype(rewards)).where(mask, 0)
    seq = r.sum(dim=1)
    stats = {
        "process/token_mean": float(r.sum() / mask.sum()),
        "process/seq_sum_mean": float(seq.mean()),
    }
    correct = acc >= 0.5
    if correct.any():
        stats["process/seq_sum_correct_mean"] = float(seq[correct].mean())
    if (~correct).any():
        stats["process/seq_sum_wrong_mean"] = float(seq[~correct].mean())
    return stats


@dataclass
class PRMResult:
    q: Tensor  # [n, T] token log-ratios logp_prm - logp_ref used as rewards
    loss: float  # mean PRM loss over mini-batches (nan without an update)
    grad_norm: float
    skipped: int  # optimizer steps skipped for a non-finite loss or gradient norm
    tokens: int  # packed tokens through the model (this rank)
    flops: int  # model FLOPs of the pass (this rank; flops.py), forward and backward


def prm_pass(
    prm: nn.Module,
    opt: torch.optim.Optimizer | None,
    batch: Batch,
    ref_logp: Tensor,
    d: Dist,
    *,
    mini_batches: int,
    beta: float,
    temperature: float,
    max_norm: float,
    update: bool,
) -> PRMResult:
    """One pass over the batch in `mini_batches` chunks: PRM loss BCE(sigmoid(beta Σq), acc), q from this forward.

    With update=True each chunk's q comes from the same forward whose loss then steps the optimizer
    (prm.update='after'); with update=False it is a plain no-grad forward."""
    q = padded(batch, d.device)
    labels = batch.acc.to(d.device, torch.float32)
    losses, norms, skipped, tokens, flops = [], [], 0, 0, 0
    for seqs in chunks(batch.n, mini_batches):
        total, n_seqs = torch.zeros((), device=d.device), len(seqs)
        flops += (TRAIN_FACTOR if update else 1) * own_flops(prm, batch, seqs, d)
        with torch.set_grad_enabled(update):
            for mb in micro_batches(batch, seqs, d):
                ref = mb.head_from_padded(ref_logp)
                loss, q_mb = prm(
                    mb.input_ids,
                    mb.position_ids,
                    lambda h, w, b, mb=mb, ref=ref, n_seqs=n_seqs: linear_prm_loss(
                        h,
                        w,
                        mb.head_targets,
                        ref,
                        mb.head_seq_ids,
                        labels,
                        beta=beta,
                        temperature=temperature,
                        bias=b,
                        num_seqs=n_seqs,
                    ),
                    mb.pos,
                )
                loss = loss * (0.0 if mb.filler else float(d.world))
                if update:
                    loss.backward()
                total += loss.detach()  # stays on the device: one host sync per mini-batch, below
                mb.head_to_padded(q_mb, q)
                tokens += 0 if mb.filler else mb.num_tokens
        total = float(all_sum(total)) / d.world
        losses.append(total)
        if update:
            norm, skip = clip_and_step(prm, opt, max_norm=max_norm, loss=total)
            norms.append(norm)
            skipped += skip
    if not update:
        reshard_after_no_grad(prm)
    nan = float("nan")
    return PRMResult(
        q=all_sum(q),
        loss=sum(losses) / len(losses),
        grad_norm=sum(norms) / len(norms) if norms else nan,
        skipped=skipped,
        tokens=tokens,
        flops=flops,
    )


def prm_phase(
    prm: nn.Module, opt: torch.optim.Optimizer | None, batch: Batch, ref_logp: Tensor, d: Dist, *,
    config: PRMConfig, temperature: float,
) -> tuple[tuple[Tensor, int], dict[str, float]]:  # fmt: skip
    """prime.md step 5: PRM forward and update in the configured order, then the token rewards.

    Returns ((rewards r [n, T], optimizer steps skipped for a non-finite loss or norm), stats). A diverged PRM
    (non-finite q on a valid token) gives non-finite rewards and `prm/nonfinite_tokens` > 0, no traceback:
    the caller skips the policy update."""
    mask, acc = batch.mask.to(d.device), batch.acc.to(d.device)
    kw = dict(
        mini_batches=config.mini_batches, beta=config.beta, temperature=temperature, max_norm=config.grad_clip
    )
    res = prm_pass(prm, opt, batch, ref_logp, d, update=config.update != "none", **kw)
    stats = {"prm/pairwise_acc": _pairwise_accuracy(res.q, mask, acc, batch.k), "perf/prm_flops": res.flops}
    q = res.q
    if config.update == "before":  # rewards from a second forward, after the update
        after = prm_pass(prm, None, batch, ref_logp, d, update=False, **kw)
        q, stats["perf/prm_flops"] = after.q, res.flops + after.flops
        stats["prm/pairwise_acc_after"] = _pairwise_accuracy(q, mask, acc, batch.k)
    stats["prm/loss"] = res.loss
    scale = getattr(prm, "logit_scale", None)
    if scale is not None:  # a collective under FSDP: every rank runs prm_phase
        stats["prm/logit_scale"] = float(
            (scale.full_tensor() if isinstance(scale, DTensor) else scale).detach()
        )
    if config.update != "none":
        stats.update({"prm/grad_norm": res.grad_norm, "prm/skipped_steps": res.skipped})
    nonfinite = int((~torch.isfinite(q) & mask).sum())
    if nonfinite:
        stats["prm/nonfinite_tokens"] = nonfinite
        return (torch.full_like(q, float("nan")), res.skipped), stats
    rewards = process_token_rewards(q, mask, granularity=config.granularity, norm=config.norm)
    stats.update(process_reward_stats(rewards, mask, acc))
    return (rewards, res.skipped), stats


def _pairwise_accuracy(q: Tensor, mask: Tensor, acc: Tensor, k: int) -> float | None:
    """prm_pairwise_accuracy of the sequence sums of q; None (undefined) when a sum is not finite."""
    seq = torch.where(mask, q, 0).sum(1)
    return prm_pairwise_accuracy(seq, acc, k=k) if bool(torch.isfinite(seq).all()) else None
