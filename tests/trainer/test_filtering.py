"""Group-accuracy filter and refill buffer: hand-written expectations."""

import pickle

import pytest
import torch

from fastprime.trainer.filtering import RefillBuffer, group_filter_mask, prompts_to_sample


def test_bounds_inclusive_k4():
    # groups of 4 with 0, 1, 3, 4 and 2 correct: 1 and 3 sit on the inclusive bounds 0.25 >= 0.2, 0.75 <= 0.8
    acc = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 0], dtype=torch.float32)
    keep = group_filter_mask(acc, k=4)
    assert keep.tolist() == [False, True, True, False, True]


def test_bounds_exactly_on_the_limits_k5():
    # 1/5 = 0.2 and 3/5 = 0.6 equal the bounds; float32 rounds 3/5 up to 0.6000000238, still kept
    acc = torch.tensor([1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0], dtype=torch.float32)
    assert group_filter_mask(acc, k=5, lo=0.2, hi=0.6).tolist() == [True, True, False]
    assert group_filter_mask(acc, k=5, lo=0.21, hi=0.59).tolist() == [False, False, False]


def test_soft_scores_k2():
    acc = torch.tensor([0.1, 0.0, 0.5, 0.0, 0.9, 0.8])  # means 0.05, 0.25, 0.85
    assert group_filter_mask(acc, k=2).tolist() == [False, True, False]


def test_truncation_filter():
    acc = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])  # all three groups pass the accuracy bounds
    truncated = torch.tensor([False, False, False, True, False, False])
    assert group_filter_mask(acc, k=2, truncated=truncated).tolist() == [True, True, True]
    kept = group_filter_mask(acc, k=2, truncated=truncated, drop_truncated=True)
    assert kept.tolist() == [True, False, True]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(acc=torch.zeros(6), k=4), "n = 6"),
        (dict(acc=torch.tensor([0.0, float("nan")]), k=2), "acc\\[1\\] = nan"),
        (dict(acc=torch.zeros(4), k=0), "k = 0"),
        (dict(acc=torch.zeros(4), k=2, lo=0.9, hi=0.1), "lo = 0.9"),
        (dict(acc=torch.zeros(4), k=2, drop_truncated=True), "truncated"),
        (
            dict(acc=torch.zeros(4), k=2, truncated=torch.zeros(3, dtype=torch.bool), drop_truncated=True),
            "truncated has shape \\(3,\\)",
        ),
        (dict(acc=torch.zeros(2, 2), k=2), "1-D"),
    ],
)
def test_filter_errors(kwargs, match):
    acc = kwargs.pop("acc")
    with pytest.raises(ValueError, match=match):
        group_filter_mask(acc, **kwargs)


def test_refill_buffer_fifo_order():
    buf = RefillBuffer()
    buf.add(["a", "b", "c"])
    assert len(buf) == 3
    assert buf.take(2) == ["a", "b"]
    buf.add(["d"])
    assert buf.take(5) == ["c", "d"]
    assert len(buf) == 0
    assert buf.take(3) == []
    assert buf.take(0) == []


def test_refill_buffer_state_dict_round_trip():
    buf = RefillBuffer()
    groups = [
        {"prompt": "p1", "acc": [1.0, 0.0]},
        {"prompt": "p2", "acc": [0.0, 1.0]},
        {"prompt": "p3", "acc": []},
    ]
    buf.add(groups)
    buf.take(1)
    state = pickle.loads(pickle.dumps(buf.state_dict()))  # what a checkpoint does to it
    groups[1]["acc"].append(9.0)  # later mutation of the trainer's objects must not leak into the checkpoint
    restored = RefillBuffer()
    restored.load_state_dict(state)
    assert len(restored) == 2
    assert restored.take(5) == [{"prompt": "p2", "acc": [0.0, 1.0]}, {"prompt": "p3", "acc": []}]


def test_refill_buffer_errors():
    with pytest.raises(ValueError, match="batch_size = -1"):
        RefillBuffer().take(-1)
    with pytest.raises(ValueError, match="groups"):
        RefillBuffer().load_state_dict({"items": []})


@pytest.mark.parametrize(
    "need, pass_rate, most, want",
    [
        (32, None, 256, 32),  # no rate yet: the batch size, as before any round
        (32, 1.0, 256, 32),  # everything passes: no surplus
        (10, 0.5, 256, 25),  # (10 + sqrt(10 * 0.5)) / 0.5 = 24.47
        (32, 0.9, 256, 38),  # (32 + sqrt(32 * 0.1)) / 0.9 = 37.54
        (32, 1 / 3, 256, 110),  # (32 + sqrt(32 * 2/3)) * 3 = 109.86
        (32, 1 / 3, 96, 96),  # capped
        (32, 0.0, 96, 96),  # nothing passed: as many as allowed
        (5, 0.99, 96, 6),  # (5 + sqrt(0.05)) / 0.99 = 5.28
    ],
)
def test_prompts_to_sample(need, pass_rate, most, want):
    assert prompts_to_sample(need, pass_rate, most=most) == want


@pytest.mark.parametrize(
    "need, pass_rate, most, match",
    [(0, 0.5, 10, "need"), (11, 0.5, 10, "need"), (4, -0.1, 10, "pass_rate"), (4, 1.5, 10, "pass_rate"),
     (4, float("nan"), 10, "pass_rate")],
)  # fmt: skip
def test_prompts_to_sample_errors(need, pass_rate, most, match):
    with pytest.raises(ValueError, match=match):
        prompts_to_sample(need, pass_rate, most=most)
