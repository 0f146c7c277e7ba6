"""fastprime's PRIME trainer: rollout, verification, online implicit-PRM update and PPO policy update."""
