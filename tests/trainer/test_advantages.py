"""Advantage estimators with two reward sources: every expected number is worked out by hand.

Tensors are fp64 so the comparisons can be tight; padding holds NaN wherever an input may carry garbage.
"""

import math

import pytest
import torch

from fastprime.trainer.advantages import compute_advantages

NAN = float("nan")


def t64(rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, t64(expected), rtol=tol, atol=tol)


def lengths_mask(lengths, t):
    return torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


# K = 2, lengths 3 and 2
ACC2 = t64([1.0, 0.0])
MASK2 = lengths_mask([3, 2], 3)

# K = 4, lengths 2, 3, 1, 2; per-response means mu = [3, 1, -2, 1], sum 3
ACC4 = t64([1.0, 0.0, 0.5, 1.0])
MASK4 = lengths_mask([2, 3, 1, 2], 3)
R4 = t64([[2, 4, NAN], [3, 0, 0], [-2, NAN, NAN], [1, 1, NAN]])


def test_rloo_outcome_k2_unequal_lengths():
    # a = [1 - 0, 0 - 1] on the last valid token; gamma = 1 returns spread it to every earlier token
    out = compute_advantages(ACC2, None, MASK2, k=2, whiten=False)
    close(out.returns, [[1, 1, 1], [-1, -1, 0]])
    close(out.advantages, [[1, 1, 1], [-1, -1, 0]])
    assert out.process_returns is None


def test_rloo_outcome_gamma_half():
    out = compute_advantages(ACC2, None, MASK2, k=2, gamma=0.5, whiten=False)
    close(out.returns, [[0.25, 0.5, 1], [-0.5, -1, 0]])


def test_rloo_outcome_whitened():
    # valid returns 1, 1, 1, -1, -1: mean 1/5, unbiased var (3 * 0.8^2 + 2 * 1.2^2) / 4 = 1.2
    s = math.sqrt(1.2 + 1e-8)
    out = compute_advantages(ACC2, None, MASK2, k=2)
    close(out.advantages, [[0.8 / s, 0.8 / s, 0.8 / s], [-1.2 / s, -1.2 / s, 0]])
    close(out.returns, [[1, 1, 1], [-1, -1, 0]])  # returns stay unwhitened


def test_rloo_k4_outcome_soft_scores():
    # a_i = acc_i - (2.5 - acc_i) / 3
    out = compute_advantages(ACC4, None, MASK4, k=4, whiten=False)
    close(out.returns, [[0.5, 0.5, 0], [-5 / 6, -5 / 6, -5 / 6], [-1 / 6, 0, 0], [0.5, 0.5, 0]])


def test_rloo_k4_process_reference_formula():
    # r' = 4/3 r - sum(mu)/3 = 4/3 r - 1 -> [5/3, 13/3], [3, -1, -1], [-11/3], [1/3, 1/3]
    out = compute_advantages(ACC4, R4, MASK4, k=4, outcome_coef=0.0, whiten=False)
    process = [[6, 13 / 3, 0], [1, -2, -1], [-11 / 3, 0, 0], [2 / 3, 1 / 3, 0]]
    close(out.process_returns, process)
    close(out.returns, process)


def test_rloo_k4_process_paper_formula():
    # r' = r - mean_{j != i} mu_j with baselines [0, 2/3, 5/3, 2/3]; first-token returns equal the reference
    out = compute_advantages(ACC4, R4, MASK4, k=4, process_loo="paper", outcome_coef=0.0, whiten=False)
    close(out.process_returns, [[6, 4, 0], [1, -4 / 3, -2 / 3], [-11 / 3, 0, 0], [2 / 3, 1 / 3, 0]])


def test_rloo_k4_both_sources_summed():
    out = compute_advantages(ACC4, R4, MASK4, k=4, whiten=False)
    close(out.returns, [[6.5, 29 / 6, 0], [1 / 6, -17 / 6, -11 / 6], [-23 / 6, 0, 0], [7 / 6, 5 / 6, 0]])
    close(out.outcome_returns, [[0.5, 0.5, 0], [-5 / 6, -5 / 6, -5 / 6], [-1 / 6, 0, 0], [0.5, 0.5, 0]])


def test_rloo_process_baseline_stays_within_each_group_and_gamma_coefs():
    # group A: r [1, 0], [0, 1] -> mu [.5, .5], r' = 2 r - 1; group B: r [4, 4], [0, 0] -> mu [4, 0], r' = 2 r - 4
    acc = t64([1, 0, 1, 1])
    r = t64([[1, 0], [0, 1], [4, 4], [0, 0]])
    mask = torch.ones(4, 2, dtype=torch.bool)
    out = compute_advantages(acc, r, mask, k=2, gamma=0.5, outcome_coef=0.5, process_coef=2.0, whiten=False)
    # process returns (gamma .5): A [0.5, -1], [-0.5, 1]; B [6, 4], [-6, -4]
    close(out.process_returns, [[0.5, -1], [-0.5, 1], [6, 4], [-6, -4]])
    # outcome: A a = [1, -1] -> [0.5, 1], [-0.5, -1]; B all equal -> 0
    close(out.outcome_returns, [[0.5, 1], [-0.5, -1], [0, 0], [0, 0]])
    close(out.returns, [[1.25, -1.5], [-1.25, 1.5], [12, 8], [-12, -8]])


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_rloo_all_equal_group_has_zero_outcome(value):
    acc = torch.full((4,), value, dtype=torch.float64)
    out = compute_advantages(acc, None, MASK4, k=4, whiten=False)
    assert torch.equal(out.returns, torch.zeros(4, 3, dtype=torch.float64))


def test_zero_process_rewards_add_nothing():
    out = compute_advantages(ACC4, torch.zeros(4, 3, dtype=torch.float64), MASK4, k=4, whiten=False)
    assert torch.equal(out.process_returns, torch.zeros(4, 3, dtype=torch.float64))
    close(out.returns, [[0.5, 0.5, 0], [-5 / 6, -5 / 6, -5 / 6], [-1 / 6, 0, 0], [0.5, 0.5, 0]])


def test_process_coef_zero_is_plain_outcome_rloo_exactly():
    r = torch.randn(2, 3, dtype=torch.float64)
    plain = compute_advantages(ACC2, None, MASK2, k=2)
    off = compute_advantages(ACC2, r, MASK2, k=2, process_coef=0.0)
    assert torch.equal(off.advantages, plain.advantages) and torch.equal(off.returns, plain.returns)
    assert off.process_returns is None
    s = math.sqrt(1.2 + 1e-8)  # the hand-whitened outcome-only values of test_rloo_outcome_whitened
    close(off.advantages, [[0.8 / s, 0.8 / s, 0.8 / s], [-1.2 / s, -1.2 / s, 0]])


def test_grpo_outcome_k4():
    # acc [1, 0, 0, 0]: mean 1/4, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    d = 0.5 + 1e-6
    out = compute_advantages(t64([1, 0, 0, 0]), None, MASK4, k=4, estimator="grpo", whiten=False)
    close(
        out.returns, [[0.75 / d, 0.75 / d, 0], [-0.25 / d] * 3, [-0.25 / d, 0, 0], [-0.25 / d, -0.25 / d, 0]]
    )


def test_grpo_outcome_and_process_k2():
    # outcome: mean .5, unbiased std sqrt(.5); process pool {1, 3, 2}: mean 2, unbiased std 1
    c = 0.5 / (math.sqrt(0.5) + 1e-6)
    e = 1 / (1 + 1e-6)
    r = t64([[1, 3], [2, NAN]])
    out = compute_advantages(ACC2, r, lengths_mask([2, 1], 2), k=2, estimator="grpo", whiten=False)
    close(out.process_returns, [[0, e], [0, 0]])
    close(out.outcome_returns, [[c, c], [-c, 0]])
    close(out.returns, [[c, c + e], [-c, 0]])


def test_grpo_constant_process_group_is_zero():
    out = compute_advantages(ACC2, t64([[0.3, 0.3], [0.3, 0.3]]), torch.ones(2, 2), k=2, estimator="grpo")
    assert torch.equal(out.process_returns, torch.zeros(2, 2, dtype=torch.float64))


def test_reinforce_no_baseline_gamma_half():
    # process returns (gamma .5): row 0 [1 + 2/2, 2] = [2, 2]; row 1 [3 + (-1 + 2/2)/2, -1 + 1, 2] = [3, 0, 2]
    # outcome: acc on every valid token, undiscounted (prime.md: A_t = r_o + sum_s gamma^(s-t) r_s)
    r = t64([[1, 2, NAN], [3, -1, 2]])
    mask = lengths_mask([2, 3], 3)
    out = compute_advantages(ACC2, r, mask, k=2, estimator="reinforce", gamma=0.5, whiten=False)
    close(out.process_returns, [[2, 2, 0], [3, 0, 2]])
    close(out.returns, [[3, 3, 0], [3, 0, 2]])
    solo = compute_advantages(ACC2, r, mask, k=1, estimator="reinforce", gamma=0.5, whiten=False)
    close(solo.returns, [[3, 3, 0], [3, 0, 2]])  # no group baseline, so k does not matter


def test_whitening_with_process_rewards():
    r = t64([[1, 0], [0, NAN]])  # mu [.5, 0]: r' = 2 r - .5 -> [1.5, -.5], [-.5]
    # process returns [1, -.5], [-.5]; outcome returns [1, 1], [-1]
    out = compute_advantages(ACC2, r, lengths_mask([2, 1], 2), k=2)
    close(out.returns, [[2, 0.5], [-1.5, 0]])
    # valid returns 2, .5, -1.5: mean 1/3, deviations 5/3, 1/6, -11/6; unbiased var (100 + 1 + 121) / 36 / 2
    s = math.sqrt(222 / 72 + 1e-8)
    close(out.advantages, [[(5 / 3) / s, (1 / 6) / s], [(-11 / 6) / s, 0]])
    assert out.stats["advantages/mean"] == pytest.approx(0.0, abs=1e-12)
    assert out.stats["returns/process_mean"] == pytest.approx(0.0, abs=1e-12)
    assert out.stats["returns/process_abs_mean"] == pytest.approx(2 / 3, abs=1e-12)
    assert out.stats["returns/outcome_mean"] == pytest.approx((1 + 1 - 1) / 3, abs=1e-12)


def test_fp32_and_bool_int_masks():
    out = compute_advantages(ACC2.float(), None, MASK2.int(), k=2, whiten=False)
    assert out.advantages.dtype == torch.float32
    torch.testing.assert_close(out.returns, torch.tensor([[1.0, 1, 1], [-1, -1, 0]]))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.zeros(3), None, torch.ones(3, 2)), dict(k=2), "n = 3"),
        ((torch.zeros(2), None, torch.ones(2, 2)), dict(k=1), "k = 1"),
        ((torch.zeros(2), None, torch.ones(2, 2)), dict(k=1, estimator="grpo"), "k = 1"),
        ((torch.tensor([NAN, 0.0]), None, torch.ones(2, 2)), dict(k=2), "acc\\[0\\] = nan"),
        ((torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 2)), dict(k=2), "process_rewards has shape"),
        ((torch.zeros(2), None, torch.ones(4, 2)), dict(k=2), "mask has 4 rows"),
        (
            (torch.zeros(2), torch.tensor([[0.0, NAN], [0, 0]]), torch.ones(2, 2)),
            dict(k=2),
            "\\[0, 1\\] = nan",
        ),
        ((torch.zeros(2), None, torch.ones(2, 2)), dict(k=2, estimator="ppo"), "estimator = 'ppo'"),
        ((torch.zeros(2), None, torch.ones(2, 2)), dict(k=2, process_loo="x"), "process_loo = 'x'"),
        ((torch.zeros(2), None, torch.ones(2, 2)), dict(k=2, gamma=0.0), "gamma = 0.0"),
        ((torch.zeros(2), None, torch.ones(2, 2)), dict(k=2, outcome_coef=NAN), "outcome_coef = nan"),
        ((torch.zeros(2), None, torch.tensor([[1, 0], [0, 0]])), dict(k=2), "response 1 has no valid"),
        (
            (torch.zeros(1), None, torch.tensor([[1, 0]])),
            dict(k=1, estimator="reinforce"),
            "at least 2 valid",
        ),
    ],
)
def test_advantages_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_advantages(*args, **kwargs)
