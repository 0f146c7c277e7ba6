"""PRIME's policy update, prime.md step 7: the PPO clipped surrogate over packed micro-batches.

`ratio = exp(logp - logp_old)`, `L = -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A)` with optional
dual clip, k3 KL to the reference and entropy bonus, all inside the fused `linear_ppo_loss`; the per-token
weights of `aggregation_weights` make the accumulated gradient that of one big mini-batch (see passes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastprime.kernels import aggregation_weights, linear_ppo_loss
from fastprime.trainer.batch import Batch
from fastprime.trainer.config import PolicyConfig
from fastprime.trainer.flops import TRAIN_FACTOR
from fastprime.trainer.passes import (
    Dist,
    LogProbs,
    all_sum,
    clip_and_step,
    micro_batches,
    own_flops,
    padded,
    shuffled_chunks,
)


@dataclass
class PolicyResult:
    loss: float
    grad_norm: float
    skipped: int
    steps: int
    tokens: int
    flops: int  # model FLOPs of the update's forwards and backwards (this rank; flops.py)
    # clip fractions, approx KL, entropy, ratio, KL to reference (token-weighted means)
    stats: dict[str, float]
    # on-policy with engine log-probs (vllm): [n, T] log-probs of the update's forward = the skipped logp_old
    logp: Tensor | None = None


def minibatch_seed(seed: int, step: int, epoch: int = 0) -> int:
    """Seed of one epoch's mini-batch shuffle: a function of the run seed, step and epoch, so resume replays it."""
    return ((seed * 1_000_003 + step) * 101 + epoch) % (2**62)


def policy_pass(
    policy: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Batch,
    old_logp: Tensor | None,
    advantages: Tensor,
    d: Dist,
    *,
    ref_logp: Tensor | None,
    mini_batches: int,
    epochs: int,
    loss_agg: str,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    entropy_coef: float,
    temperature: float,
    max_norm: float,
    seed: int = 0,
) -> PolicyResult:
    """PPO clipped-surrogate update: `epochs` passes over the batch in `mini_batches` optimizer steps.

    Each epoch splits a fresh permutation of the responses, seeded by (`seed`, epoch), into the mini-batches.
    old_logp None (on-policy, see `is_on_policy`): each token's logp_old is its own forward's logp, detached; where
    the engine reported sampling log-probs (vllm), those log-probs come back as `PolicyResult.logp` for the
    agreement check."""
    if old_logp is None and (epochs, mini_batches) != (1, 1):
        raise ValueError(f"old_logp=None needs epochs=1 and mini_batches=1, got {epochs} and {mini_batches}")
    lengths = [len(r) for r in batch.responses]
    names = ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl", "entropy", "ratio", "kl_ref")
    sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=d.device)  # token-weighted sums, count
    losses, norms, skipped, tokens, steps, flops = [], [], 0, 0, 0, 0
    # on-policy, the forward's log-probs stand in for the skipped old pass in the engine-agreement check
    keep_logp = old_logp is None and batch.sample_logprobs is not None
    forward_logp = padded(batch, d.device) if keep_logp else None
    ppo_kw = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, temperature=temperature,
                  entropy_coef=entropy_coef)  # fmt: skip
    for epoch in range(epochs):
        for seqs in shuffled_chunks(batch.n, mini_batches, seed=minibatch_seed(seed, 0, epoch)):
            norm_kw = _normaliser(loss_agg, lengths, seqs)
            total = torch.zeros((), device=d.device)
            flops += TRAIN_FACTOR * own_flops(policy, batch, seqs, d)
            for mb in micro_batches(batch, seqs, d):
                w = aggregation_weights(mb.head_mask, mb.head_seq_ids, loss_agg, **norm_kw)
                w = w * (0.0 if mb.filler else float(d.world))
                loss, st = _micro_batch_loss(policy, mb, w, advantages, old_logp, ref_logp, kl_coef, ppo_kw)
                loss.backward()
                if forward_logp is not None:
                    mb.head_to_padded(st.logp.detach(), forward_logp)
                total += loss.detach()  # loss and stats stay on the device: one host sync per mini-batch
                if not mb.filler:
                    sums += _weighted_stats(st, names, mb.head_mask.sum())
                    tokens += mb.num_tokens
            total = float(all_sum(total)) / d.world
            losses.append(total)
            norm, skip = clip_and_step(policy, opt, max_norm=max_norm, loss=total)
            norms.append(norm)
            skipped += skip
            steps += 1
    sums = all_sum(sums)
    stats = {k: float(sums[i] / sums[-1].clamp(min=1)) for i, k in enumerate(names)}
    return PolicyResult(
        loss=sum(losses) / len(losses),
        grad_norm=sum(norms) / len(norms),
        skipped=skipped,
        steps=steps,
        tokens=tokens,
        flops=flops,
        stats=stats,
        logp=all_sum(forward_logp) if forward_logp is not None else None,
    )


def _micro_batch_loss(
    policy: nn.Module, mb, w: Tensor, advantages: Tensor, old_logp: Tensor | None, ref_logp: Tensor | None,
    kl_coef: float, ppo_kw: dict,
):  # fmt: skip
    """One packed micro-batch's PPO loss and stats: the body's forward, then the fused head on its response rows."""
    adv = mb.head_from_padded(advantages)
    old = mb.head_from_padded(old_logp) if old_logp is not None else None
    ref = mb.head_from_padded(ref_logp) if ref_logp is not None else None
    kl = kl_coef if ref is not None else 0.0

    def head(h: Tensor, wt: Tensor, b: Tensor | None):
        return linear_ppo_loss(
            h, wt, mb.head_targets, old, adv, w, ref_logp=ref, kl_coef=kl, bias=b, **ppo_kw
        )

    return policy(mb.input_ids, mb.position_ids, head, mb.pos)


def _normaliser(loss_agg: str, lengths: list[int], seqs: list[int]) -> dict[str, int]:
    """The mini-batch's global token or sequence count that `aggregation_weights` divides by."""
    if loss_agg == "token-mean":
        return {"num_tokens": sum(lengths[i] for i in seqs)}
    return {"num_seqs": len(seqs)}


def _weighted_stats(st, names: tuple[str, ...], n_tok: Tensor) -> Tensor:
    """[len(names) + 1] float64: each token-mean statistic times the micro-batch's tokens, then the count."""
    n_tok = n_tok.to(torch.float64)
    return torch.stack([getattr(st, k).to(torch.float64) for k in names] + [n_tok.new_ones(())]) * n_tok


def is_on_policy(config: PolicyConfig) -> bool:
    """One epoch of one mini-batch: the update's single forward is at the rollout weights, logp_old = logp."""
    return config.epochs == 1 and config.mini_batches == 1


def policy_phase(
    policy: nn.Module, opt: torch.optim.Optimizer, batch: Batch, logprobs: LogProbs, advantages: Tensor, d: Dist,
    *, config: PolicyConfig, temperature: float, seed: int = 0,
) -> tuple[PolicyResult, dict[str, float]]:  # fmt: skip
    """prime.md step 7: `config.epochs` PPO passes over the batch, `config.mini_batches` optimizer steps each."""
    c = config
    res = policy_pass(
        policy, opt, batch, logprobs.old, advantages, d, ref_logp=logprobs.ref, mini_batches=c.mini_batches,
        epochs=c.epochs, loss_agg=c.loss_agg, clip_low=c.clip_low, clip_high=c.clip_high, dual_clip=c.dual_clip,
        kl_coef=c.kl_coef, entropy_coef=c.entropy_coef, temperature=temperature, max_norm=c.grad_clip, seed=seed,
    )  # fmt: skip
    stats = {
        "policy/loss": res.loss,
        "policy/grad_norm": res.grad_norm,
        "policy/skipped_steps": res.skipped,
        "perf/policy_flops": res.flops,
        "policy/clip_frac": res.stats["clip_frac_low"] + res.stats["clip_frac_high"],
        **{f"policy/{k}": v for k, v in res.stats.items()},
    }
    if logprobs.old is None:  # the skipped old pass's metric, from the same weights' forward here
        stats["policy/entropy_old"] = res.stats["entropy"]
    return res, stats
