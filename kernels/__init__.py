"""Fused lm_head kernels: per-token log-probs, entropy, PPO and implicit-PRM losses without [tokens x vocab] logits."""
