"""Fixtures shared by the trainer tests."""

import pytest
import torch
import torch.distributed as dist

from fastprime.trainer.batch import Batch
from fastprime.trainer.models import init_distributed
from fastprime.trainer.passes import Dist


@pytest.fixture(scope="module")
def group_of_one():
    """A process group of one (gloo on CPU) for the passes, torn down after the module."""
    rank, world, device = init_distributed()
    yield Dist(rank=rank, world=world, device=device, token_budget=0)
    dist.destroy_process_group()


def _random_batch(vocab: int) -> Batch:
    """Six random prompt/response pairs in groups of k = 2 with fixed outcome labels."""
    g = torch.Generator().manual_seed(7)
    prompts = [
        torch.randint(6, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(6)
    ]
    responses = [
        torch.randint(6, vocab, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
        for _ in range(6)
    ]
    acc = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    return Batch(
        prompts=prompts, responses=responses, acc=acc, truncated=torch.zeros(6, dtype=torch.bool), k=2
    )


@pytest.fixture
def random_batch():
    return _random_batch
