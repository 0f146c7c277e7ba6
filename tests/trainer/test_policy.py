"""The policy update (policy.py): micro-batch accumulation equals one big batch for every aggregation mode, and
the loss equals a hand computation."""

import copy

import pytest
import torch

from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.models import full_state_dict, shard_model
from fastprime.trainer.passes import Dist, logprob_pass
from fastprime.trainer.policy import policy_pass


def _update(lm, batch, d, budget, mode, adv):
    d = Dist(rank=d.rank, world=d.world, device=d.device, token_budget=budget)
    model = shard_model(copy.deepcopy(lm), device=d.device)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    old, _ = logprob_pass(model, batch, d, temperature=1.0)
    res = policy_pass(
        model, opt, batch, old, adv, d, ref_logp=None, mini_batches=1, epochs=1, loss_agg=mode, clip_low=0.2,
        clip_high=0.2, dual_clip=None, kl_coef=0.0, entropy_coef=0.0, temperature=1.0, max_norm=1e9,
    )  # fmt: skip
    return res, full_state_dict(model)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_equal_one_batch_and_hand_loss(group_of_one, random_batch, mode):
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0)
    batch = random_batch(len(tok))
    mask = batch.mask
    adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3)) * mask
    big, w_big = _update(lm, batch, group_of_one, 4096, mode, adv)
    small, w_small = _update(lm, batch, group_of_one, 16, mode, adv)

    # At the first step ratio = 1, so the loss is -sum_t w_t A_t with the mode's weights, computed here by hand.
    lengths = mask.sum(1).double()
    if mode == "token-mean":
        w = mask / lengths.sum()
    elif mode == "seq-mean-token-mean":
        w = mask / lengths[:, None] / len(lengths)
    else:
        w = mask / len(lengths)
    expected = float(-(w * adv.double()).sum())
    assert big.loss == pytest.approx(expected, abs=1e-6), f"{mode}: loss {big.loss} vs hand {expected}"
    assert small.loss == pytest.approx(expected, abs=1e-6)
    for k in w_big:
        torch.testing.assert_close(
            w_small[k], w_big[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{mode} {k}: {m}"
        )
    start = lm.state_dict()
    moved = max(float((w_big[k] - start[k]).abs().max()) for k in w_big)
    assert moved > 1e-4, f"{mode}: the update did not move the weights ({moved})"


def test_mini_batches_are_seeded_shuffles_not_slices():
    from fastprime.trainer.passes import shuffled_chunks
    from fastprime.trainer.policy import minibatch_seed

    parts = shuffled_chunks(16, 4, seed=minibatch_seed(0, 5))
    assert sorted(i for p in parts for i in p) == list(range(16)) and [len(p) for p in parts] == [4] * 4
    contiguous = [list(range(4 * j, 4 * j + 4)) for j in range(4)]
    assert parts != contiguous and any(p != list(range(p[0], p[0] + len(p))) for p in parts), parts
    assert shuffled_chunks(16, 4, seed=minibatch_seed(0, 5)) == parts, "same seed and step: same order"
    assert shuffled_chunks(16, 4, seed=minibatch_seed(0, 6)) != parts, "another step: another order"


def test_policy_pass_uses_the_seeded_order(group_of_one, random_batch):
    """Two mini-batches: the same seed gives the same weights, another seed another split and other weights."""
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0)
    batch = random_batch(len(tok))
    adv = torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(3)) * batch.mask
    d = Dist(rank=group_of_one.rank, world=group_of_one.world, device=group_of_one.device, token_budget=4096)

    def run(seed):
        model = shard_model(copy.deepcopy(lm), device=d.device)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        old, _ = logprob_pass(model, batch, d, temperature=1.0)
        policy_pass(
            model, opt, batch, old, adv, d, ref_logp=None, mini_batches=2, epochs=1,
            loss_agg="token-mean", clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0, entropy_coef=0.0,
            temperature=1.0, max_norm=1e9, seed=seed,
        )  # fmt: skip
        return full_state_dict(model)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
