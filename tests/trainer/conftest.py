"""Fixtures shared by the trainer tests.

The trainer's value tests compare against fp64 eager references with fp32 tolerances, so they run on CPU in
fp32 on every host, by construction: on a CUDA machine the trainer would otherwise pick the GPU and bf16 compute
(models.shard_model). Subprocess runs get hosts.CPU_ONLY_ENV for the same reason (the golden run's values are
CPU values; torchrun tests use gloo on CPU); in-process runs of main() use `cpu_only`.
"""

import pytest
import torch
import torch.distributed as dist

from fastprime.trainer.batch import Batch
from fastprime.trainer.models import _free_port
from fastprime.trainer.passes import Dist


@pytest.fixture(scope="module")
def group_of_one():
    """A process group of one (gloo on CPU, also on a CUDA host) for the passes, torn down after the module."""
    init = f"tcp://127.0.0.1:{_free_port()}"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    yield Dist(rank=0, world=1, device=torch.device("cpu"), token_budget=0)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def cuda_group_of_one():
    """A process group of one on the first GPU (nccl), as the trainer runs on a CUDA host."""
    device = torch.device("cuda", 0)
    init = f"tcp://127.0.0.1:{_free_port()}"
    dist.init_process_group("nccl", init_method=init, rank=0, world_size=1, device_id=device)
    yield Dist(rank=0, world=1, device=device, token_budget=0)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def cpu_only():
    """For in-process runs of main(): the trainer sees no GPU, so it runs gloo on CPU in fp32 as on a CPU host
    (the test process has already initialised CUDA, so CUDA_VISIBLE_DEVICES cannot do this here)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        yield


def _random_batch(vocab: int) -> Batch:
    """Six random responses in groups of k = 2 (each group's two share their prompt, as a rollout's do, so passes
    pack the prompt once: packing.py) with fixed outcome labels."""
    g = torch.Generator().manual_seed(7)
    prompts = [
        torch.randint(6, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(3)
    ]
    prompts = [p for p in prompts for _ in range(2)]
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


@pytest.fixture(scope="session")
def scoring_model(tmp_path_factory):
    """A tiny HF model folder (model + tokenizer) that answers right about half the time (scoring_model.py),
    with a 64-prompt JSONL data file for it: (model folder, data file). Built once per session (seconds)."""
    from scoring_model import build_scoring_model, write_scoring_data

    tmp = tmp_path_factory.mktemp("scoring")
    return build_scoring_model(tmp / "model"), write_scoring_data(tmp / "train.jsonl", 64)
