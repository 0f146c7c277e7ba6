"""Fused linear log-probs: hidden states + lm_head -> per-token log-prob and entropy, no [N, V] logits.

Shared core contract (used by ppo_loss.py / prm_loss.py; change only by editing this comment, agreed):
    logprobs_forward(hidden, weight, targets, bias, *, temperature, ignore_index, impl, need_entropy)
        hidden [N, D], weight [V, D], targets [N] int, bias [V] or None
        -> (logp [N] fp32, entropy [N] fp32 or None, lse [N] fp32 of the tempered logits);
        ignored rows: logp = entropy = 0.
    logprobs_backward(hidden, weight, targets, bias, lse, entropy, grad_logp, grad_entropy, *,
                      temperature, ignore_index, impl, needs_input_grad)
        grad_logp [N] = dL/dlogp_t, grad_entropy [N] or None = dL/dH_t (entropy needed then)
        -> (grad_hidden [N, D] hidden.dtype, grad_weight [V, D] weight.dtype, grad_bias [V] or None);
        ignored rows get no gradient.
    resolve_impl(impl, hidden) -> "reference" | "chunked" | "triton"
    LinearHeadLossFunction: the autograd Function both losses share (the core plus a per-token epilogue).
impl here is "chunked" or "triton" (resolve "auto" first). fp64 inputs (chunked only) compute and return fp64.
The chunked path lives in reference.py, the Triton kernels and launchers in linear_logprobs_triton.py.

Math: z = (h W^T + b) / T in fp32, p = softmax(z), lse = logsumexp(z), logp_t = z[t] - lse,
H = lse - sum p z.  G = g (onehot(t) - p) - e p (z - sum p z);  dh = G W / T, dW = G^T h / T, db = sum G / T.
Saved between forward and backward: lse and entropy, O(N).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from fastprime.kernels.dispatch import flatten_head_inputs, resolve_impl
from fastprime.kernels.reference import (
    chunked_logprobs_backward,
    chunked_logprobs_forward,
    linear_logprobs_reference,
)

__all__ = [
    "LinearHeadLossFunction",
    "LogprobsEntropy",
    "linear_logprobs",
    "logprobs_backward",
    "logprobs_forward",
    "resolve_impl",
]


def _core_functions(impl: str) -> tuple[Callable, Callable]:
    """impl "chunked" or "triton" -> its (forward, backward); Triton is imported only when asked for."""
    if impl == "chunked":
        return chunked_logprobs_forward, chunked_logprobs_backward
    if impl == "triton":
        from fastprime.kernels.linear_logprobs_triton import triton_logprobs_backward, triton_logprobs_forward

        return triton_logprobs_forward, triton_logprobs_backward
    raise ValueError(f"the log-prob core's impl={impl!r} must be 'chunked' or 'triton'")


def logprobs_forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    impl: str,
    need_entropy: bool,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """hidden [N, D], weight [V, D], targets [N], bias [V] or None -> (logp [N], entropy [N] or None, lse [N]).

    fp32 outputs; ignored rows give logp = entropy = 0. impl: "chunked" or "triton". Inputs are not checked
    here (callers run `check_inputs` once on the user-facing tensors).
    """
    forward, _ = _core_functions(impl)
    return forward(
        hidden,
        weight,
        targets,
        bias,
        temperature=temperature,
        ignore_index=ignore_index,
        need_entropy=need_entropy,
    )


def logprobs_backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    impl: str,
    needs_input_grad: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients given per-row upstream grads. Shapes as in `logprobs_forward`, plus lse [N] and entropy [N]
    from it, grad_logp [N], grad_entropy [N] or None -> (grad_hidden [N, D], grad_weight [V, D],
    grad_bias [V]), each None where `needs_input_grad` (hidden, weight, bias) is False or bias is None.
    """
    _, backward = _core_functions(impl)
    return backward(
        hidden, weight, targets, bias, lse, entropy, grad_logp, grad_entropy,
        temperature=temperature, ignore_index=ignore_index, needs_input_grad=needs_input_grad,
    )  # fmt: skip


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper of the core on 2-D inputs: saves inputs plus O(N) lse/entropy, recomputes logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, temperature, ignore_index, impl, need_entropy):
        logp, entropy, lse = logprobs_forward(
            hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index, impl=impl,
            need_entropy=need_entropy,
        )  # fmt: skip
        ctx.save_for_backward(hidden, weight, targets, bias, lse, entropy)
        ctx.options = (temperature, ignore_index, impl)
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, targets, bias, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, impl = ctx.options
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grads = logprobs_backward(
            hidden, weight, targets, bias, lse, entropy, grad_logp.contiguous(),
            None if grad_entropy is None else grad_entropy.contiguous(),
            temperature=temperature, ignore_index=ignore_index, impl=impl,
            needs_input_grad=(ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]),
        )  # fmt: skip
        grad_h, grad_w, grad_b = grads
        return grad_h, grad_w, None, grad_b, None, None, None, None


class LinearHeadLossFunction(torch.autograd.Function):
    """A scalar loss of the head's per-token log-probs (and entropy), fused onto the core; 2-D inputs.

    forward(hidden [N, D], weight [V, D], bias [V] or None, targets [N], temperature, ignore_index, impl,
    need_entropy, epilogue) runs the core, then `epilogue(logp [N], entropy [N] or None) -> (loss 0-dim,
    g [N] = dL/dlogp, e [N] = dL/dH or None, extras)` and returns (loss, *extras), extras being detached
    per-token outputs. Saved: the inputs plus lse, g, e (and the entropy when e is given), O(N); the backward
    recomputes the logits in `logprobs_backward` with the upstream grad_loss times (g, e).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, impl, need_entropy, epilogue):
        logp, entropy, lse = logprobs_forward(
            hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index, impl=impl,
            need_entropy=need_entropy,
        )  # fmt: skip
        loss, g, e, extras = epilogue(logp, entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, None if e is None else entropy, g, e)
        ctx.options = (temperature, ignore_index, impl)
        ctx.mark_non_differentiable(*extras)
        return (loss, *extras)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_extras):
        hidden, weight, bias, targets, lse, entropy, g, e = ctx.saved_tensors
        temperature, ignore_index, impl = ctx.options
        grad_h, grad_w, grad_b = logprobs_backward(
            hidden, weight, targets, bias, lse, entropy, g * grad_loss, None if e is None else e * grad_loss,
            temperature=temperature, ignore_index=ignore_index, impl=impl,
            needs_input_grad=(ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]),
        )  # fmt: skip
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


class LogprobsEntropy(NamedTuple):
    """Per-token log-prob of the target and entropy of the tempered distribution, both fp32 [...]."""

    logp: Tensor
    entropy: Tensor


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
) -> Tensor | LogprobsEntropy:
    """Per-token log-probs (and entropy) of a linear head without materialising the [..., V] logits.

    hidden [..., D] fp32/fp16/bf16, weight [V, D] same dtype, targets [...] int, bias [V] or None.
    Returns fp32 logp [...] or, with return_entropy, LogprobsEntropy(logp [...], entropy [...]). Equals
        z = (hidden.float() @ weight.float().T + bias) / temperature
        logp = torch.log_softmax(z, -1).gather(-1, targets[..., None])[..., 0]
        entropy = torch.distributions.Categorical(logits=z).entropy()
    with 0 (and no gradient) where targets == ignore_index. Differentiable w.r.t. hidden, weight and bias
    through both outputs. impl: "auto" (env FASTPRIME_KERNEL_IMPL, else "triton" on CUDA, "chunked" on CPU),
    "reference" (eager, materialises logits), "chunked" or "triton".
    """
    lead = targets.shape
    impl, h2, t2 = flatten_head_inputs(
        hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index, impl=impl
    )
    if impl == "reference":
        logp, entropy = linear_logprobs_reference(
            h2, weight, t2, bias=bias, temperature=temperature, ignore_index=ignore_index
        )
    else:
        logp, entropy, _ = LinearLogprobsFunction.apply(
            h2, weight, t2, bias, float(temperature), int(ignore_index), impl, return_entropy
        )
    logp = logp.reshape(lead)
    return LogprobsEntropy(logp, entropy.reshape(lead)) if return_entropy else logp
