"""Implicit-PRM cross-entropy fused onto the lm_head: hidden states -> per-token log-ratio rewards -> loss, no logits.

For a token t of sequence s (seq_ids[t] = s >= 0 and target kept):  q_t = logp_t - ref_logp_t (0 elsewhere).
    score_s = beta Σ_{t in s} q_t          L = (1/n) Σ_{s present} BCE_with_logits(score_s, y_s)
with soft labels y_s in [0, 1], n the number of sequences present (with at least one token) or the trainer's
global `num_seqs` (micro-batch accumulation). PRIME (Cui et al. 2025, arXiv:2502.01456): docs prime.md, step 5.
Gradient (the per-token epilogue), using d BCE(x, y)/dx = sigmoid(x) - y:
    g_t = dL/dlogp_t = beta (sigmoid(score_s) - y_s) / n   for t in s, else 0
ref_logp and labels are constants: the gradient flows into the PRM (hidden, weight, bias) only. The forward saves
lse and g, O(tokens); the backward recomputes the logits one vocab chunk at a time in the shared core
(`LinearHeadLossFunction`, core.py), with g folded into the logit gradient. The specification is
`linear_prm_loss_reference` in reference.py.
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from fastprime.kernels.checks import IGNORE_INDEX, check_per_token, flat_constant, flatten_head_inputs
from fastprime.kernels.core import HeadOptions, LinearHeadLossFunction
from fastprime.kernels.reference import compute_dtype, linear_prm_loss_reference
from fastprime.kernels.triton_core import on_device


@triton.jit
def _prm_scores_kernel(
    logp_ptr, ref_ptr, tgt_ptr, seq_ptr, q_ptr, score_ptr, count_ptr, N, ignore_index, BLOCK: tl.constexpr
):  # fmt: skip
    """q_t = logp_t - ref_t on member tokens; score[s] += q_t and count[s] += 1 (atomics: segment sums)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < N
    tgt = tl.load(tgt_ptr + offs, mask=in_range, other=ignore_index)
    seq = tl.load(seq_ptr + offs, mask=in_range, other=-1)
    member = in_range & (tgt != ignore_index) & (seq >= 0)
    logp = tl.load(logp_ptr + offs, mask=member, other=0.0)
    ref = tl.load(ref_ptr + offs, mask=member, other=0.0)
    q = tl.where(member, logp - ref, 0.0)
    tl.store(q_ptr + offs, q, mask=in_range)
    # relaxed: the sums are read only after the kernel ends, so no ordering beyond atomicity is needed.
    tl.atomic_add(score_ptr + seq, q, mask=member, sem="relaxed")
    tl.atomic_add(count_ptr + seq, tl.where(member, 1.0, 0.0), mask=member, sem="relaxed")


@triton.jit
def _prm_grad_kernel(tgt_ptr, seq_ptr, dsum_ptr, g_ptr, N, ignore_index, BLOCK: tl.constexpr):
    """g_t = dL/d(Σ_{t in s} q_t) at s = seq_t on member tokens, 0 elsewhere (a gather)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < N
    tgt = tl.load(tgt_ptr + offs, mask=in_range, other=ignore_index)
    seq = tl.load(seq_ptr + offs, mask=in_range, other=-1)
    member = in_range & (tgt != ignore_index) & (seq >= 0)
    dsum = tl.load(dsum_ptr + seq, mask=member, other=0.0)
    tl.store(g_ptr + offs, tl.where(member, dsum, 0.0), mask=in_range)


def _bce_and_grad(
    raw_score: Tensor, count: Tensor, labels: Tensor, beta: float, num_seqs
) -> tuple[Tensor, Tensor]:
    """Per-sequence BCE over [S] sums of q -> (loss 0-dim, dL/d(raw sum of q) [S]); S-sized, so plain torch."""
    present = count > 0
    n = present.sum().to(raw_score.dtype).clamp(min=1.0) if num_seqs is None else num_seqs
    score = beta * raw_score
    bce = F.binary_cross_entropy_with_logits(score, labels, reduction="none")
    loss = torch.where(present, bce, 0.0).sum() / n
    dscore = torch.where(present, torch.sigmoid(score) - labels, 0.0) / n
    return loss, beta * dscore


def prm_epilogue(
    logp: Tensor,
    ref_logp: Tensor,
    targets: Tensor,
    seq_ids: Tensor,
    labels: Tensor,
    *,
    beta: float,
    ignore_index: int,
    num_seqs: int | float | Tensor | None,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """logp, ref_logp, targets, seq_ids [N]; labels [S] -> (loss 0-dim, q [N], g = dL/dlogp [N])."""
    N, S = logp.shape[0], labels.shape[0]
    dt = logp.dtype
    score = torch.zeros(S, dtype=dt, device=logp.device)
    count = torch.zeros(S, dtype=dt, device=logp.device)
    if impl == "triton":
        BLOCK = 1024
        grid = (triton.cdiv(N, BLOCK),)
        q, g = torch.empty_like(logp), torch.empty_like(logp)
        with on_device(logp):
            _prm_scores_kernel[grid](
                logp, ref_logp, targets, seq_ids, q, score, count, N, ignore_index, BLOCK=BLOCK
            )
            loss, dscore = _bce_and_grad(score, count, labels, beta, num_seqs)
            _prm_grad_kernel[grid](targets, seq_ids, dscore, g, N, ignore_index, BLOCK=BLOCK)
        return loss, q, g
    member = (targets != ignore_index) & (seq_ids >= 0)
    seq = torch.where(member, seq_ids, 0)
    q = torch.where(member, logp - ref_logp, 0.0)
    score.index_add_(0, seq, q)
    count.index_add_(0, seq, member.to(dt))
    loss, dscore = _bce_and_grad(score, count, labels, beta, num_seqs)
    return loss, q, torch.where(member, dscore[seq], 0.0)


def _check_prm_inputs(targets, ref_logp, seq_ids, labels, beta, num_seqs) -> None:
    check_per_token(targets, ref_logp=ref_logp, seq_ids=seq_ids)
    if seq_ids.dtype.is_floating_point or seq_ids.dtype == torch.bool:
        raise ValueError(f"seq_ids must be an integer tensor, got {seq_ids.dtype}")
    if labels.dim() != 1 or not labels.dtype.is_floating_point:
        raise ValueError(
            f"labels must be a float tensor [S], got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if isinstance(num_seqs, (int, float)) and num_seqs <= 0:
        raise ValueError(f"num_seqs must be positive, got {num_seqs}")
    # Reading back two bools (a sync) buys a clear error instead of an out-of-bounds atomic in a kernel.
    if labels.device.type == "meta":  # shapes only (structural memory tests): no values to check
        return
    if seq_ids.numel() > 0 and bool((seq_ids >= labels.shape[0]).any()):
        raise ValueError(
            f"seq_ids must be < S = labels.shape[0] = {labels.shape[0]}, found {int(seq_ids.max())}"
        )
    if labels.numel() > 0 and bool(((labels < 0) | (labels > 1) | labels.isnan()).any()):
        raise ValueError(
            f"labels must lie in [0, 1], found {labels[(labels < 0) | (labels > 1) | labels.isnan()][0].item()}"
        )


def linear_prm_loss(
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
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Implicit-PRM cross-entropy on outcome labels, straight from hidden states and the lm_head, no [N, V] logits.

    Args:
        hidden: [..., D] fp32/fp16/bf16 PRM hidden states (packed sequences back to back); weight: [V, D];
            bias: [V] or None; targets: [...] int64 (ignore_index: in no sequence, no gradient).
        ref_logp: [...] frozen reference log-probs of the targets; seq_ids: [...] int, sequence index 0..S-1 of
            each token, < 0 for tokens of no sequence (prompt, padding); labels: [S] outcome scores in [0, 1].
        num_seqs: divide by this global sequence count instead of the sequences present (micro-batching).
        impl: "reference" (eager, materialises logits), "chunked", "triton", or "auto".
    Returns:
        loss: 0-dim fp32, differentiable w.r.t. hidden, weight, bias only;
        q: [...] fp32 detached token rewards logp - ref_logp (0 outside sequences).
    Equivalent to `linear_prm_loss_reference`: logp = log_softmax((hidden @ weight.T + bias) / T)[targets],
    score_s = beta Σ_{t in s} q_t, loss = Σ_{s present} BCE_with_logits(score_s, labels_s) / n.
    """
    shape = targets.shape
    impl, h, t = flatten_head_inputs(
        hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index, impl=impl
    )
    _check_prm_inputs(targets, ref_logp, seq_ids, labels, beta, num_seqs)
    dt = compute_dtype(hidden.dtype)
    ref = flat_constant(ref_logp, dt)
    seq = seq_ids.reshape(-1).to(torch.int64).contiguous()
    y = labels.detach().to(dt).contiguous()
    if impl == "reference":
        loss, q = linear_prm_loss_reference(
            h, weight, t, ref, seq, y, beta=beta, temperature=temperature, bias=bias, ignore_index=ignore_index,
            num_seqs=num_seqs,
        )  # fmt: skip
        return loss, q.reshape(shape)

    def epilogue(logp: Tensor, _entropy: None):
        loss, q, g = prm_epilogue(
            logp, ref, t, seq, y, beta=beta, ignore_index=ignore_index, num_seqs=num_seqs, impl=impl
        )
        return loss, g, None, (q,)

    head = HeadOptions(float(temperature), int(ignore_index), impl)
    loss, q = LinearHeadLossFunction.apply(h, weight, t, bias, head, False, epilogue)
    return loss, q.reshape(shape)
