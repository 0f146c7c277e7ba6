"""Fused lm_head kernels: per-token log-probs, entropy, PPO and implicit-PRM losses without [tokens x vocab] logits.

What another trainer imports: the three ops, their eager fp32 specifications, the aggregation weights the
losses take, `IGNORE_INDEX`, and the small result types. Everything else is reachable through its module.
"""

from fastprime.kernels.aggregation import aggregation_weights
from fastprime.kernels.checks import IGNORE_INDEX
from fastprime.kernels.linear_logprobs import LogprobsEntropy, linear_logprobs
from fastprime.kernels.ppo_loss import linear_ppo_loss
from fastprime.kernels.prm_loss import linear_prm_loss
from fastprime.kernels.reference import (
    PPOStats,
    linear_logprobs_reference,
    linear_ppo_loss_reference,
    linear_prm_loss_reference,
)

__all__ = [
    "IGNORE_INDEX",
    "LogprobsEntropy",
    "PPOStats",
    "aggregation_weights",
    "linear_logprobs",
    "linear_logprobs_reference",
    "linear_ppo_loss",
    "linear_ppo_loss_reference",
    "linear_prm_loss",
    "linear_prm_loss_reference",
]
