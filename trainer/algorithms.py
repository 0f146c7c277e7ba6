"""PRIME's algorithm as plain functions over [n, T] response tensors with masks (prime.md steps 3, 5, 6).

One import point for the trainer; the code lives in four files that each do one thing:
`filtering.py` (group-accuracy filter, refill buffer), `process_rewards.py` (implicit-PRM token rewards,
pairwise accuracy), `advantages.py` (RLOO / GRPO / REINFORCE with two reward sources, GAE) and
`diagnostics.py` (what the trainer logs about responses, outcomes and process rewards).
"""

from fastprime.trainer.advantages import Advantages, compute_advantages, gae_advantages
from fastprime.trainer.diagnostics import outcome_stats, process_reward_stats, response_stats
from fastprime.trainer.filtering import RefillBuffer, filter_pass_rate, group_filter_mask
from fastprime.trainer.process_rewards import prm_pairwise_accuracy, process_token_rewards

__all__ = [
    "Advantages",
    "RefillBuffer",
    "compute_advantages",
    "filter_pass_rate",
    "gae_advantages",
    "group_filter_mask",
    "outcome_stats",
    "process_reward_stats",
    "process_token_rewards",
    "prm_pairwise_accuracy",
    "response_stats",
]
