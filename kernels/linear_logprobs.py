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
impl here is "chunked" or "triton" (resolve "auto" first). fp64 inputs (chunked only) compute and return fp64.
The chunked path lives in reference.py, the Triton kernels and launchers in linear_logprobs_triton.py.

Math: z = (h W^T + b) / T in fp32, p = softmax(z), lse = logsumexp(z), logp_t = z[t] - lse,
H = lse - sum p z.  G = g (onehot(t) - p) - e p (z - sum p z);  dh = G W / T, dW = G^T h / T, db = sum G / T.
Saved between forward and backward: lse and entropy, O(N).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastprime.kernels.dispatch import check_inputs, resolve_impl
from fastprime.kernels.reference import (
    chunked_logprobs_backward,
    chunked_logprobs_forward,
    linear_logprobs_reference,
)

__all__ = ["LogprobsEntropy", "linear_logprobs", "logprobs_backward", "logprobs_forward", "resolve_impl"]


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
    if impl == "chunked":
        return chunked_logprobs_forward(
            hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index,
            need_entropy=need_entropy,
        )  # fmt: skip
    if impl == "triton":
        from fastprime.kernels.linear_logprobs_triton import triton_logprobs_forward

        return triton_logprobs_forward(
            hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index,
            need_entropy=need_entropy,
        )  # fmt: skip
    raise ValueError(f"logprobs_forward impl={impl!r} must be 'chunked' or 'triton'")


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
    if impl == "chunked":
        return chunked_logprobs_backward(
            hidden, weight, targets, bias, lse, entropy, grad_logp, grad_entropy,
            temperature=temperature, ignore_index=ignore_index, needs_input_grad=needs_input_grad,
        )  # fmt: skip
    if impl == "triton":
        from fastprime.kernels.linear_logprobs_triton import triton_logprobs_backward

        return triton_logprobs_backward(
            hidden, weight, targets, bias, lse, entropy, grad_logp, grad_entropy,
            temperature=temperature, ignore_index=ignore_index, needs_input_grad=needs_input_grad,
        )  # fmt: skip
    raise ValueError(f"logprobs_backward impl={impl!r} must be 'chunked' or 'triton'")


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
    impl = resolve_impl(impl, hidden)
    check_inputs(hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index, impl=impl)
    targets = targets.long()
    if impl == "reference":
        logp, entropy = linear_logprobs_reference(
            hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index
        )
        return LogprobsEntropy(logp, entropy) if return_entropy else logp
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    t2 = targets.reshape(-1)
    logp, entropy, _ = LinearLogprobsFunction.apply(
        h2, weight, t2, bias, float(temperature), int(ignore_index), impl, return_entropy
    )
    logp = logp.reshape(lead)
    return LogprobsEntropy(logp, entropy.reshape(lead)) if return_entropy else logp
