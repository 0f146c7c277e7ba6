"""PRIME diagnostics: hand-computed expectations."""

import pytest
import torch

from fastprime.trainer.diagnostics import outcome_stats, response_stats

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
