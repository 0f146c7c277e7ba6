"""The typed hand-offs: a Batch built from Groups keeps their order, repeats each prompt K times, and its
mask and token count match a hand count."""

import torch

from fastprime.trainer.batch import Batch, Group
from fastprime.trainer.data import Prompt


def _prompt(ids: list[int]) -> Prompt:
    return Prompt(messages=[], prompt_ids=ids, ground_truth="", ability="math")


def test_batch_from_groups_by_hand():
    prompts = [_prompt([1, 2, 3]), _prompt([4]), _prompt([5, 6])]
    groups = [
        Group(prompt=2, responses=[[7, 8], [9]], truncated=[False, True], acc=[1.0, 0.0]),
        Group(prompt=0, responses=[[10, 11, 12], [13, 14]], truncated=[False, False], acc=[0.5, 0.25]),
    ]
    batch = Batch.from_groups(groups, prompts, k=2)
    assert batch.prompts == [[5, 6], [5, 6], [1, 2, 3], [1, 2, 3]]
    assert batch.responses == [[7, 8], [9], [10, 11, 12], [13, 14]]
    assert batch.acc.tolist() == [1.0, 0.0, 0.5, 0.25] and batch.acc.dtype == torch.float32
    assert batch.truncated.tolist() == [False, True, False, False]
    assert batch.n == 4 and batch.k == 2
    # (prompt + response - 1) tokens per sequence: 3 + 2 + 5 + 4
    assert batch.num_tokens == 14
    assert batch.mask.tolist() == [
        [True, True, False],
        [True, False, False],
        [True, True, True],
        [True, True, False],
    ]
