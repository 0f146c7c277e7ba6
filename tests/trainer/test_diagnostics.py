"""PRIME diagnostics: hand-computed expectations."""

import pytest
import torch

from fastprime.trainer.diagnostics import engine_agreement_stats, outcome_stats, response_stats

NAN = float("nan")


def test_response_stats():
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    truncated = torch.tensor([True, False, False, False])
    stats = response_stats(mask, truncated=truncated)
    assert stats == {
        "response/length_mean": 7 / 4,
        "response/length_min": 0.0,
        "response/length_max": 4.0,
        "response/truncation_rate": 0.25,
    }
    assert "response/truncation_rate" not in response_stats(mask)
    with pytest.raises(ValueError, match="truncated has shape \\(3,\\)"):
        response_stats(mask, truncated=torch.zeros(3, dtype=torch.bool))


def test_outcome_stats():
    acc = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0.5, 0.5, 0.5, 0.5])
    assert outcome_stats(acc, k=4) == {
        "outcome/acc_mean": 7 / 16,  # 4 + 0 + 1 + 2 correct
        "outcome/solve_all_rate": 0.25,
        "outcome/solve_none_rate": 0.25,
        "outcome/equal_group_rate": 0.75,
    }
    with pytest.raises(ValueError, match="n = 16"):
        outcome_stats(acc, k=3)


def test_engine_agreement_stats_over_reported_tokens_only():
    old = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [-3.0, -3.0, -3.0]])
    # row 1 has no engine log-probs (a refill-buffer group); padding of row 0/1 is never read
    stats = engine_agreement_stats([[-1.25, -2.0], None, [-3.0, -2.5, -3.125]], old)
    assert stats["rollout/logprob_diff_max"] == 0.5
    assert stats["rollout/logprob_diff_mean"] == pytest.approx((0.25 + 0 + 0 + 0.5 + 0.125) / 5)
    assert engine_agreement_stats(None, old) == {}
    assert engine_agreement_stats([None, None, None], old) == {}
