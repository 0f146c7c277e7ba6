"""Fused lm_head kernels: per-token log-probs, entropy, PPO and implicit-PRM losses without [tokens x vocab] logits."""

from fastprime.kernels.aggregation import AGGREGATION_MODES, aggregation_weights
from fastprime.kernels.linear_logprobs import (
    LogprobsEntropy,
    linear_logprobs,
    logprobs_backward,
    logprobs_forward,
    resolve_impl,
)
from fastprime.kernels.ppo_loss import PPOStats, linear_ppo_loss, linear_ppo_loss_reference
from fastprime.kernels.prm_loss import linear_prm_loss, linear_prm_loss_reference
from fastprime.kernels.reference import linear_logprobs_reference

__all__ = [
    "AGGREGATION_MODES",
    "aggregation_weights",
    "PPOStats",
    "linear_ppo_loss",
    "linear_ppo_loss_reference",
    "linear_prm_loss",
    "linear_prm_loss_reference",
    "LogprobsEntropy",
    "linear_logprobs",
    "linear_logprobs_reference",
    "logprobs_backward",
    "logprobs_forward",
    "resolve_impl",
]
