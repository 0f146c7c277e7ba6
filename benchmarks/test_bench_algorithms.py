"""Time of PRIME's algorithm step at the reference run's batch shape (256 prompts x 4 samples, 3072 tokens).

Run: `python -m pytest benchmarks/test_bench_algorithms.py --benchmark-enable` (optionally FASTPRIME_BENCH_DEVICE=cuda).
These run once per iteration between the PRM pass and the PPO step; they should cost milliseconds, not seconds.
"""

import os

import pytest
import torch

from fastprime.trainer.advantages import compute_advantages
from fastprime.trainer.prm import process_token_rewards

DEVICE = os.environ.get("FASTPRIME_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
N, T, K = 1024, 3072, 4


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, T + 1, (N,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(DEVICE)
    q = (0.1 * torch.randn(N, T, generator=g)).to(DEVICE)
    acc = torch.randint(0, 2, (N,), generator=g).float().to(DEVICE)
    return q, mask, acc


def run(fn):
    out = fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce"])
def test_bench_rewards_and_advantages_gamma1(benchmark, batch, estimator):
    q, mask, acc = batch
    benchmark(
        run,
        lambda: compute_advantages(acc, process_token_rewards(q, mask), mask, k=K, estimator=estimator),
    )


def test_bench_rloo_gamma_below_one(benchmark, batch):
    q, mask, acc = batch
    r = process_token_rewards(q, mask)
    benchmark(run, lambda: compute_advantages(acc, r, mask, k=K, gamma=0.99))
