"""The model passes of one iteration over packed micro-batches: log-probs, PRM forward/update, policy update.

Every pass runs each rank's share of the batch (`packing.rank_micro_batches`), calls the model body and a
fused head from `fastprime.kernels`, and leaves per-token results in padded [n, T] response tensors that are
summed across ranks (each rank fills only its own rows), so every rank ends with the whole batch.

Loss normalisation is global: each micro-batch's loss is weighted with the mini-batch's total token or
sequence count over all micro-batches and ranks, then multiplied by the world size because FSDP averages
gradients over ranks. The accumulated gradient is then exactly that of one big mini-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from fastprime.kernels import aggregation_weights, linear_logprobs, linear_ppo_loss, linear_prm_loss
from fastprime.trainer.packing import PackedMicroBatch, rank_micro_batches


@dataclass
class Batch:
    """n = groups * k responses, grouped by prompt. prompts/responses: token id lists; acc [n]; mask [n, T]."""

    prompts: list[list[int]]
    responses: list[list[int]]
    acc: Tensor
    truncated: Tensor
    k: int

    @property
    def n(self) -> int:
        return len(self.responses)

    @property
    def mask(self) -> Tensor:
        T = max(len(r) for r in self.responses)
        lengths = torch.tensor([len(r) for r in self.responses])
        return torch.arange(T)[None, :] < lengths[:, None]


@dataclass
class Dist:
    """Where this process sits: rank, world size, device, and the per-rank micro-batch token budget."""

    rank: int
    world: int
    device: torch.device
    token_budget: int


def all_sum(x: Tensor) -> Tensor:
    """Sum over ranks (in place on a copy); identity for a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def _micro_batches(batch: Batch, seqs: list[int], d: Dist) -> list[PackedMicroBatch]:
    return rank_micro_batches(
        batch.prompts,
        batch.responses,
        seqs,
        token_budget=d.token_budget,
        rank=d.rank,
        world_size=d.world,
        device=d.device,
    )


def _padded(batch: Batch, device: torch.device) -> Tensor:
    return torch.zeros(batch.n, max(len(r) for r in batch.responses), dtype=torch.float32, device=device)


def chunks(n: int, parts: int) -> list[list[int]]:
    """Split range(n) into `parts` contiguous, nearly equal chunks (mini-batches)."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts) if bounds[i + 1] > bounds[i]]


@torch.no_grad()
def logprob_pass(model: nn.Module, batch: Batch, d: Dist, *, temperature: float) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies [n, T] of the batch's responses under `model` (no gradient)."""
    logp, ent = _padded(batch, d.device), _padded(batch, d.device)
    for mb in _micro_batches(batch, list(range(batch.n)), d):
        out = model(
            mb.input_ids,
            mb.position_ids,
            lambda h, w, b, mb=mb: linear_logprobs(
                h, w, mb.targets, bias=b, temperature=temperature, return_entropy=True
            ),
        )
        mb.to_padded(out.logp, logp)
        mb.to_padded(out.entropy, ent)
    return all_sum(logp), all_sum(ent)


def clip_and_step(
    model: nn.Module, opt: torch.optim.Optimizer, *, max_norm: float, loss: float
) -> tuple[float, bool]:
    """Clip the global grad norm and step, unless loss or norm is NaN/inf: then drop the gradient. (norm, skipped)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    norm = float(norm)
    skipped = not (math.isfinite(norm) and math.isfinite(loss))
    if not skipped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, skipped


@dataclass
class PRMResult:
    q: Tensor  # [n, T] token log-ratios logp_prm - logp_ref used as rewards
    loss: float  # mean PRM loss over mini-batches (nan without an update)
    grad_norm: float
    skipped: int  # optimizer steps skipped for a non-finite loss or gradient norm
    tokens: int  # packed tokens through the model (this rank)


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
    q = _padded(batch, d.device)
    labels = batch.acc.to(d.device, torch.float32)
    losses, norms, skipped, tokens = [], [], 0, 0
    for seqs in chunks(batch.n, mini_batches):
        total, n_seqs = torch.zeros((), device=d.device), len(seqs)
        with torch.set_grad_enabled(update):
            for mb in _micro_batches(batch, seqs, d):
                ref = mb.from_padded(ref_logp)
                loss, q_mb = prm(
                    mb.input_ids,
                    mb.position_ids,
                    lambda h, w, b, mb=mb, ref=ref, n_seqs=n_seqs: linear_prm_loss(
                        h,
                        w,
                        mb.targets,
                        ref,
                        mb.seq_ids,
                        labels,
                        beta=beta,
                        temperature=temperature,
                        bias=b,
                        num_seqs=n_seqs,
                    ),
                )
                loss = loss * (0.0 if mb.filler else float(d.world))
                if update:
                    loss.backward()
                total += loss.detach()  # stays on the device: one host sync per mini-batch, below
                mb.to_padded(q_mb, q)
                tokens += 0 if mb.filler else mb.num_tokens
        total = float(all_sum(total)) / d.world
        losses.append(total)
        if update:
            norm, skip = clip_and_step(prm, opt, max_norm=max_norm, loss=total)
            norms.append(norm)
            skipped += skip
    nan = float("nan")
    return PRMResult(
        q=all_sum(q),
        loss=sum(losses) / len(losses),
        grad_norm=sum(norms) / len(norms) if norms else nan,
        skipped=skipped,
        tokens=tokens,
    )


@dataclass
class PolicyResult:
    loss: float
    grad_norm: float
    skipped: int
    steps: int
    tokens: int
    stats: dict[
        str, float
    ]  # clip fractions, approx KL, entropy, ratio, KL to reference (token-weighted means)


def policy_pass(
    policy: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Batch,
    old_logp: Tensor,
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
) -> PolicyResult:
    """PPO clipped-surrogate update: `epochs` passes over the batch in `mini_batches` optimizer steps."""
    lengths = [len(r) for r in batch.responses]
    names = ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl", "entropy", "ratio", "kl_ref")
    sums = torch.zeros(
        len(names) + 1, dtype=torch.float64, device=d.device
    )  # token-weighted sums + token count
    losses, norms, skipped, tokens, steps = [], [], 0, 0, 0
    for _ in range(epochs):
        for seqs in chunks(batch.n, mini_batches):
            if loss_agg == "token-mean":
                norm_kw = {"num_tokens": sum(lengths[i] for i in seqs)}
            else:
                norm_kw = {"num_seqs": len(seqs)}
            total = torch.zeros((), device=d.device)
            for mb in _micro_batches(batch, seqs, d):
                w = aggregation_weights(mb.response_mask, mb.seq_ids, loss_agg, **norm_kw)
                w = w * (0.0 if mb.filler else float(d.world))
                old, adv = mb.from_padded(old_logp), mb.from_padded(advantages)
                ref = mb.from_padded(ref_logp) if ref_logp is not None else None
                loss, st = policy(
                    mb.input_ids,
                    mb.position_ids,
                    lambda h, wt, b, mb=mb, w=w, old=old, adv=adv, ref=ref: linear_ppo_loss(
                        h, wt, mb.targets, old, adv, w,
                        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, temperature=temperature,
                        ref_logp=ref, kl_coef=kl_coef if ref is not None else 0.0, entropy_coef=entropy_coef, bias=b,
                    ),
                )  # fmt: skip
                loss.backward()
                total += loss.detach()  # loss and stats stay on the device: one host sync per mini-batch
                if not mb.filler:
                    n_tok = mb.response_mask.sum().to(torch.float64)
                    sums += (
                        torch.stack([getattr(st, k).to(torch.float64) for k in names] + [sums.new_ones(())])
                        * n_tok
                    )
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
        stats=stats,
    )
