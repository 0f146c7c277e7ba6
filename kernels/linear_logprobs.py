"""Fused linear log-probs: hidden states + lm_head -> per-token log-prob and entropy, no [N, V] logits.

The public function over the shared core (core.py); the specification is `linear_logprobs_reference`.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from fastprime.kernels.checks import IGNORE_INDEX, flatten_head_inputs
from fastprime.kernels.core import HeadOptions, LinearLogprobsFunction
from fastprime.kernels.reference import linear_logprobs_reference


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
    ignore_index: int = IGNORE_INDEX,
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
        opts = HeadOptions(float(temperature), int(ignore_index), impl)
        logp, entropy, _ = LinearLogprobsFunction.apply(h2, weight, t2, bias, opts, return_entropy)
    logp = logp.reshape(lead)
    return LogprobsEntropy(logp, entropy.reshape(lead)) if return_entropy else logp
