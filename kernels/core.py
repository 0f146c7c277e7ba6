"""The fused head's core as two autograd Functions: forward statistics, then a backward that recomputes logits.

Core contract (the chunked path in chunked.py and the Triton path in triton_core.py both implement it):
    logprobs_forward(hidden, weight, targets, bias, opts, *, need_entropy)
        hidden [N, D], weight [V, D], targets [N] int, bias [V] or None
        -> (logp [N] fp32, entropy [N] fp32 or None, lse [N] fp32 of the tempered logits);
        ignored rows: logp = entropy = 0.
    logprobs_backward(hidden, weight, targets, bias, lse, entropy, grad_logp, grad_entropy, opts, *,
                      needs_input_grad)
        grad_logp [N] = dL/dlogp_t, grad_entropy [N] or None = dL/dH_t (entropy needed then)
        -> (grad_hidden [N, D] hidden.dtype, grad_weight [V, D] weight.dtype, grad_bias [V] or None);
        ignored rows get no gradient.
opts.impl is "chunked" or "triton" (resolve "auto" first); fp64 inputs (chunked only) compute and return fp64.
Saved between forward and backward: the inputs plus lse and entropy (and the losses' g, e), O(N).
Both Functions take (hidden, weight, targets, bias, opts, need_entropy, ...) in that order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fastprime.kernels.chunked import chunked_logprobs_backward, chunked_logprobs_forward


@dataclass(frozen=True)
class HeadOptions:
    """The non-tensor arguments of the core: tempered by `temperature`, `ignore_index` targets carry no
    loss, `impl` "chunked" or "triton"."""

    temperature: float
    ignore_index: int
    impl: str


def _core_functions(impl: str) -> tuple[Callable, Callable]:
    """impl "chunked" or "triton" -> its (forward, backward); Triton is imported only when asked for."""
    if impl == "chunked":
        return chunked_logprobs_forward, chunked_logprobs_backward
    if impl == "triton":
        from fastprime.kernels.triton_core import triton_logprobs_backward, triton_logprobs_forward

        return triton_logprobs_forward, triton_logprobs_backward
    raise ValueError(f"the log-prob core's impl={impl!r} must be 'chunked' or 'triton'")


def logprobs_forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    opts: HeadOptions,
    *,
    need_entropy: bool,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """See the module docstring. Inputs are not checked here (the public ops run `checks.py` once)."""
    forward, _ = _core_functions(opts.impl)
    return forward(
        hidden, weight, targets, bias, temperature=opts.temperature, ignore_index=opts.ignore_index,
        need_entropy=need_entropy,
    )  # fmt: skip


def logprobs_backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    opts: HeadOptions,
    *,
    needs_input_grad: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """See the module docstring; each gradient is None where `needs_input_grad` (hidden, weight, bias) is
    False or bias is None."""
    _, backward = _core_functions(opts.impl)
    return backward(
        hidden, weight, targets, bias, lse, entropy, grad_logp, grad_entropy,
        temperature=opts.temperature, ignore_index=opts.ignore_index, needs_input_grad=needs_input_grad,
    )  # fmt: skip


class LinearLogprobsFunction(torch.autograd.Function):
    """(hidden [N, D], weight [V, D], targets [N], bias [V] or None, opts, need_entropy)
    -> (logp [N], entropy [N] or None, lse [N] non-differentiable); saves the inputs plus lse/entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, opts, need_entropy):
        logp, entropy, lse = logprobs_forward(hidden, weight, targets, bias, opts, need_entropy=need_entropy)
        ctx.save_for_backward(hidden, weight, targets, bias, lse, entropy)
        ctx.opts = opts
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, targets, bias, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_h, grad_w, grad_b = logprobs_backward(
            hidden, weight, targets, bias, lse, entropy, grad_logp.contiguous(),
            None if grad_entropy is None else grad_entropy.contiguous(), ctx.opts,
            needs_input_grad=(ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]),
        )  # fmt: skip
        return grad_h, grad_w, None, grad_b, None, None


class LinearHeadLossFunction(torch.autograd.Function):
    """A scalar loss of the head's per-token log-probs (and entropy), fused onto the core; 2-D inputs.

    forward(hidden [N, D], weight [V, D], targets [N], bias [V] or None, opts, need_entropy, epilogue) runs the
    core, then `epilogue(logp [N], entropy [N] or None) -> (loss 0-dim, g [N] = dL/dlogp, e [N] = dL/dH or
    None, extras)` and returns (loss, *extras), extras being detached per-token outputs. Saved: the inputs
    plus lse, g, e (and the entropy when e is given), O(N); the backward recomputes the logits in
    `logprobs_backward` with the upstream grad_loss times (g, e).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, opts, need_entropy, epilogue):
        logp, entropy, lse = logprobs_forward(hidden, weight, targets, bias, opts, need_entropy=need_entropy)
        loss, g, e, extras = epilogue(logp, entropy)
        ctx.save_for_backward(hidden, weight, targets, bias, lse, None if e is None else entropy, g, e)
        ctx.opts = opts
        ctx.mark_non_differentiable(*extras)
        return (loss, *extras)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_extras):
        hidden, weight, targets, bias, lse, entropy, g, e = ctx.saved_tensors
        need_b = bias is not None and ctx.needs_input_grad[3]
        grad_h, grad_w, grad_b = logprobs_backward(
            hidden, weight, targets, bias, lse, entropy, g * grad_loss, None if e is None else e * grad_loss,
            ctx.opts, needs_input_grad=(ctx.needs_input_grad[0], ctx.needs_input_grad[1], need_b),
        )  # fmt: skip
        return grad_h, grad_w, None, grad_b, None, None, None
