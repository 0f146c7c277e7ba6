"""Fused lm_head kernels: per-token log-probs, entropy, PPO and implicit-PRM losses without [tokens x vocab] logits."""
from fastprime.kernels.aggregation import AGGREGATION_MODES, aggregation_weights  # noqa: F401
