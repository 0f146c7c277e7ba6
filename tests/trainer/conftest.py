"""Fixtures shared by the trainer tests."""

import pytest
import torch.distributed as dist

from fastprime.trainer.models import init_distributed
from fastprime.trainer.passes import Dist


@pytest.fixture(scope="module")
def group_of_one():
    """A process group of one (gloo on CPU) for the passes, torn down after the module."""
    rank, world, device = init_distributed()
    yield Dist(rank=rank, world=world, device=device, token_budget=0)
    dist.destroy_process_group()
