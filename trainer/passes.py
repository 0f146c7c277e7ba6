"""The packed micro-batch pass machinery, and the log-prob pass without gradient (prime.md step 4).

The PRM pass (prm.py) and the policy update (policy.py) use the same helpers.

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

from fastprime.kernels import linear_logprobs
from fastprime.trainer.batch import Batch
from fastprime.trainer.flops import packed_flops
from fastprime.trainer.packing import PackedMicroBatch, plan_micro_batches, rank_micro_batches, segments


@dataclass
class Dist:
    """Where this process sits: rank, world size, device; and how it packs micro-batches: the per-rank token budget,
    and whether responses share their prompt (packing.py; not on transformers' flash-attn varlen path)."""

    rank: int
    world: int
    device: torch.device
    token_budget: int
    share_prompts: bool = True


def all_sum(x: Tensor) -> Tensor:
    """Sum over ranks (in place on a copy); identity for a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def micro_batches(batch: Batch, seqs: list[int], d: Dist) -> list[PackedMicroBatch]:
    return rank_micro_batches(
        batch.prompts,
        batch.responses,
        seqs,
        token_budget=d.token_budget,
        rank=d.rank,
        world_size=d.world,
        share_prompts=d.share_prompts,
        device=d.device,
    )


def own_flops(model: nn.Module, batch: Batch, seqs: list[int], d: Dist) -> int:
    """Model FLOPs (flops.py) of one forward of `model` over this rank's share of `seqs` as `micro_batches` packs
    it (shared prompts once per micro-batch; fillers carry no weight and are not counted)."""
    plan = plan_micro_batches(
        batch.prompts, batch.responses, seqs, token_budget=d.token_budget, world_size=d.world,
        share_prompts=d.share_prompts,
    )[d.rank]  # fmt: skip
    return sum(
        packed_flops(
            model.lm.config,
            segments(batch.prompts, batch.responses, mb, share_prompts=d.share_prompts),
            head_tokens=sum(len(batch.responses[i]) for i in mb),
        )
        for mb in plan
        if mb
    )


def padded(batch: Batch, device: torch.device) -> Tensor:
    return torch.zeros(batch.n, max(len(r) for r in batch.responses), dtype=torch.float32, device=device)


def chunks(n: int, parts: int) -> list[list[int]]:
    """Split range(n) into `parts` contiguous, nearly equal chunks (mini-batches)."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts) if bounds[i + 1] > bounds[i]]


def shuffled_chunks(n: int, parts: int, *, seed: int) -> list[list[int]]:
    """Split a seeded permutation of range(n) into `parts` nearly equal mini-batches (each sorted).

    The reference shuffles its PPO mini-batches; seeding from the run seed and step keeps resume exact."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sorted(perm[i] for i in c) for c in chunks(n, parts)]


@torch.no_grad()
def logprob_pass(
    model: nn.Module, batch: Batch, d: Dist, *, temperature: float, parts: int = 1
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies [n, T] of the batch's responses under `model` (no gradient).

    parts: pack each of `chunks(n, parts)` separately, as a pass over that many mini-batches does."""
    logp, ent = padded(batch, d.device), padded(batch, d.device)
    for mb in (mb for seqs in chunks(batch.n, parts) for mb in micro_batches(batch, seqs, d)):
        out = model(
            mb.input_ids,
            mb.position_ids,
            lambda h, w, b, mb=mb: linear_logprobs(
                h, w, mb.head_targets, bias=b, temperature=temperature, return_entropy=True
            ),
            mb.pos,
        )
        mb.head_to_padded(out.logp, logp)
        mb.head_to_padded(out.entropy, ent)
    reshard_after_no_grad(model)
    return all_sum(logp), all_sum(ent)


def reshard_after_no_grad(model: nn.Module) -> None:
    """Reshard the FSDP root after forwards without gradient. The root keeps its parameters (embeddings, final
    norm, lm_head) unsharded after a forward, expecting the backward to reshard them; with no backward they stay
    unsharded, and the next forward with gradient then gives those parameters wrong gradients (measured: the
    policy update after the log-prob pass moved the embeddings by 0.05 more than an eager fp64 update,
    tests/trainer/test_policy.py). Resharding restores the state a fresh model starts from. A model left
    unwrapped (one process without mixed precision: models.shard_model) has nothing to reshard."""
    if hasattr(model, "reshard"):
        model.reshard()


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
class LogProbs:
    """Phase 4's result: [n, T] per-token tensors of the sampled responses, 0 on padding."""

    old: (
        Tensor | None
    )  # the policy's log-probs before the update (logp_old); None when the update is on-policy
    entropy: Tensor | None  # the policy's entropy at each response position; None with `old`
    ref: Tensor | None  # the frozen reference's log-probs; None when neither the PRM nor a KL term uses them


def logprob_phase(
    policy: nn.Module, ref: nn.Module | None, batch: Batch, d: Dist, *, temperature: float, timer,
    ref_parts: int = 1,
    on_policy: bool = False,
) -> tuple[LogProbs, dict[str, float]]:  # fmt: skip
    """prime.md step 4: old and reference log-probs without gradient (the trainer's own, not the engine's).

    ref_parts: pack the reference pass in the PRM pass's mini-batches (prm.mini_batches). The packing decides
    the float rounding of a forward; with the same packing a PRM equal to the reference gives q = 0 exactly,
    where a different packing gives ~5e-7 noise that batch_norm used to blow up into rewards of order 1.

    on_policy (one epoch of one mini-batch, `policy.is_on_policy`): the update's only forward runs the weights
    this pass would, so logp_old = that forward's log-probs, detached; the pass is skipped (TRL skips it too),
    `old` is None and the metric `logprob/old_pass_skipped` = 1. `policy/entropy_old` then comes from the policy
    pass (policy_phase). Each pass that runs reports its model FLOPs, `perf/logprob_<old|ref>_flops`."""
    old = entropy = ref_logp = None
    stats: dict[str, float] = {"logprob/old_pass_skipped": 1} if on_policy else {}
    if not on_policy:
        with timer("logprob_old"):
            old, entropy = logprob_pass(policy, batch, d, temperature=temperature)
        stats["perf/logprob_old_flops"] = own_flops(policy, batch, list(range(batch.n)), d)
        mask = batch.mask.to(d.device)
        stats["policy/entropy_old"] = float((entropy * mask).sum() / mask.sum())
    if ref is not None:
        with timer("logprob_ref"):
            ref_logp, _ = logprob_pass(ref, batch, d, temperature=temperature, parts=ref_parts)
        stats["perf/logprob_ref_flops"] = sum(own_flops(ref, batch, c, d) for c in chunks(batch.n, ref_parts))
    return LogProbs(old, entropy, ref_logp), stats
