"""A PRM equal to the reference gives exactly zero process rewards (issue 9 item 3): the reference pass is
packed like the PRM pass, and batch_norm does not blow float noise up to returns of order 1."""

import copy

import torch

from fastprime.trainer.batch import Batch
from fastprime.trainer.config import PRMConfig
from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.metrics import Timer
from fastprime.trainer.models import shard_model
from fastprime.trainer.passes import Dist, logprob_phase
from fastprime.trainer.prm import prm_phase, process_token_rewards


def test_batch_norm_leaves_sub_noise_returns_near_zero():
    q = torch.tensor([[5e-7, -3e-7, 2e-7], [-5e-7, 1e-7, 0.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    r = process_token_rewards(q, mask, norm="batch_norm")
    assert r.abs().max() < 1e-3, r  # was ~0.5: divided by max |return| ~ 5e-7 + 1e-6


def _batch(vocab: int) -> Batch:
    g = torch.Generator().manual_seed(11)
    prompts, responses = [], []
    for _ in range(8):
        p = torch.randint(6, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(2):
            prompts.append(p)
            responses.append(
                torch.randint(6, vocab, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
            )
    acc = torch.tensor([1.0, 0.0] * 8)
    return Batch(
        prompts=prompts, responses=responses, acc=acc, truncated=torch.zeros(16, dtype=torch.bool), k=2
    )


def test_frozen_prm_equal_to_reference_gives_zero_q_with_four_mini_batches(group_of_one):
    """The step's own phases (logprob_phase, then prm_phase) with prm.update = none and 4 mini-batches."""
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0)
    d = Dist(rank=0, world=1, device=group_of_one.device, token_budget=160)
    ref = shard_model(copy.deepcopy(lm), trainable=False, device=d.device)
    prm = shard_model(copy.deepcopy(lm), trainable=False, device=d.device)
    batch = _batch(len(tok))
    cfg = PRMConfig(update="none", mini_batches=4)
    logprobs, _ = logprob_phase(
        ref, ref, batch, d, temperature=1.0, timer=Timer(d.device), ref_parts=cfg.mini_batches
    )
    (rewards, skipped), stats = prm_phase(prm, None, batch, logprobs.ref, d, config=cfg, temperature=1.0)
    assert torch.count_nonzero(rewards) == 0, float(rewards.abs().max())
    assert stats["process/seq_sum_mean"] == 0.0 and skipped == 0
