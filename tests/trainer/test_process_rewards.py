"""Implicit-PRM token rewards and PRM pairwise accuracy: hand-computed expectations."""

import pytest
import torch

from fastprime.trainer.algorithms import prm_pairwise_accuracy, process_token_rewards

NAN = float("nan")
# two responses of lengths 3 and 2; the padding holds NaN to prove it is never read into the result
Q = torch.tensor([[1.0, -2.0, 3.0, NAN], [0.5, 0.5, NAN, NAN]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-12, atol=1e-12)


def test_token_no_norm():
    close(process_token_rewards(Q, MASK, norm="none"), [[1.0, -2.0, 3.0, 0.0], [0.5, 0.5, 0.0, 0.0]])


def test_token_batch_norm():
    # reverse cumsums: row 0 [2, 1, 3], row 1 [1, 0.5] -> the largest absolute is 3
    d = 3 + 1e-6
    r = process_token_rewards(Q, MASK, granularity="token", norm="batch_norm")
    close(r, [[1 / d, -2 / d, 3 / d, 0.0], [0.5 / d, 0.5 / d, 0.0, 0.0]])


def test_whole_no_norm():
    r = process_token_rewards(Q, MASK, granularity="whole", norm="none")
    close(r, [[0.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 0.0]])


def test_whole_batch_norm():
    # the whole sum on the last token: reverse cumsums row 0 [2, 2, 2], row 1 [1, 1] -> 2
    d = 2 + 1e-6
    r = process_token_rewards(Q, MASK, granularity="whole")
    close(r, [[0.0, 0.0, 2 / d, 0.0], [0.0, 1 / d, 0.0, 0.0]])


def test_batch_norm_uses_absolute_value_of_negative_returns():
    q = torch.tensor([[-4.0, 1.0]], dtype=torch.float64)  # reverse cumsum [-3, 1] -> 3
    r = process_token_rewards(q, torch.ones(1, 2, dtype=torch.bool))
    close(r, [[-4 / (3 + 1e-6), 1 / (3 + 1e-6)]])


def test_zero_q_stays_zero():
    r = process_token_rewards(torch.zeros(2, 4), MASK)
    assert torch.equal(r, torch.zeros(2, 4))


def test_bf16_input_computes_in_fp32():
    r = process_token_rewards(Q.nan_to_num(0).bfloat16(), MASK, norm="none")
    assert r.dtype == torch.float32
    close(r, [[1.0, -2.0, 3.0, 0.0], [0.5, 0.5, 0.0, 0.0]])


@pytest.mark.parametrize(
    "q, mask, kwargs, match",
    [
        (torch.tensor([[1.0, NAN]]), torch.ones(1, 2), {}, "q\\[0, 1\\] = nan"),
        (torch.tensor([[1.0, float("inf")]]), torch.ones(1, 2), {}, "q\\[0, 1\\] = inf"),
        (torch.zeros(2, 3), torch.ones(2, 4), {}, "q has shape \\(2, 3\\)"),
        (torch.zeros(2, 2), torch.tensor([[1, 1], [0, 0]]), {}, "response 1 has no valid token"),
        (torch.zeros(1, 2), torch.tensor([[1, 2]]), {}, "0/1"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"granularity": "step"}, "granularity = 'step'"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"norm": "max"}, "norm = 'max'"),
    ],
)
def test_token_rewards_errors(q, mask, kwargs, match):
    with pytest.raises(ValueError, match=match):
        process_token_rewards(q, mask, **kwargs)


def test_pairwise_accuracy_hard_and_soft_labels():
    acc = torch.tensor([1, 0, 0, 1, 1.0, 0.5, 0, 0, 1, 1, 1, 1])
    s = torch.tensor([2, -1, 3, 0.5, 1, 2, 0, -1, 5, 1, 2, 3])
    # group 1, pairs with different acc: (0,1) right, (0,2) wrong, (1,3) right, (2,3) wrong -> 2/4
    # group 2 (soft), weight |da|: (0,1) .5 wrong, (0,2) 1 right, (0,3) 1 right, (1,2) .5 right,
    #   (1,3) .5 right -> 3 / 3.5 = 6/7
    # group 3: all scores equal, no pair, left out of the mean
    assert prm_pairwise_accuracy(s, acc, k=4) == pytest.approx((0.5 + 6 / 7) / 2, abs=1e-12)


def test_pairwise_accuracy_tie_counts_wrong_and_none_without_pairs():
    assert prm_pairwise_accuracy(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), k=2) == 0.0
    assert (
        prm_pairwise_accuracy(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]), k=2) == 0.0
    )  # either order
    assert prm_pairwise_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), k=2) == 1.0
    assert (
        prm_pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 1, 0, 0]), k=2) is None
    )


def test_pairwise_accuracy_errors():
    with pytest.raises(ValueError, match="seq_q_sum has 3 entries"):
        prm_pairwise_accuracy(torch.zeros(3), torch.zeros(4), k=2)
    with pytest.raises(ValueError, match="k = 1"):
        prm_pairwise_accuracy(torch.zeros(4), torch.zeros(4), k=1)
    with pytest.raises(ValueError, match="seq_q_sum\\[0\\] = nan"):
        prm_pairwise_accuracy(torch.tensor([NAN, 0.0]), torch.zeros(2), k=2)
