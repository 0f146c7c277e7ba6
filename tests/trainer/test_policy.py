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


def _on_policy_run(lm, batch, d, adv, *, skip: bool, mini_batches: int = 1, epochs: int = 1):
    """One update from `lm`: (the policy phase's metrics, weights after, logprob-phase stats, old log-probs)."""
    from fastprime.trainer.config import PolicyConfig
    from fastprime.trainer.metrics import Timer
    from fastprime.trainer.passes import logprob_phase
    from fastprime.trainer.policy import policy_phase

    model = shard_model(copy.deepcopy(lm), device=d.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = PolicyConfig(mini_batches=mini_batches, epochs=epochs, entropy_coef=0.01)
    lp, lp_stats = logprob_phase(
        model, None, batch, d, temperature=1.0, timer=Timer(d.device), on_policy=skip
    )
    _, stats = policy_phase(model, opt, batch, lp, adv, d, config=cfg, temperature=1.0)
    return stats, full_state_dict(model), lp_stats, lp.old


def test_on_policy_skip_of_the_old_pass_gives_identical_numbers(group_of_one, random_batch):
    """One epoch, one mini-batch: the skipped old pass gives bit-identical loss, stats and updated weights."""
    from fastprime.trainer.config import PolicyConfig
    from fastprime.trainer.policy import is_on_policy

    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0)
    batch = random_batch(len(tok))
    adv = torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(5)) * batch.mask
    d = Dist(rank=0, world=1, device=group_of_one.device, token_budget=32)  # several micro-batches
    full, w_full, st_full, old = _on_policy_run(lm, batch, d, adv, skip=False)
    fast, w_fast, st_fast, none = _on_policy_run(lm, batch, d, adv, skip=True)
    assert old is not None and none is None
    assert st_fast == {"logprob/old_pass_skipped": 1} and "logprob/old_pass_skipped" not in st_full
    assert full["policy/ratio"] == 1.0 and fast["policy/ratio"] == 1.0
    for key in ("policy/loss", "policy/grad_norm", "policy/entropy", "policy/approx_kl"):
        assert fast[key] == full[key], f"{key}: {fast[key]} with the skip, {full[key]} without"
    # the old pass's entropy metric is still reported, from the policy pass (same weights, same tokens)
    assert fast["policy/entropy_old"] == pytest.approx(st_full["policy/entropy_old"], rel=1e-6)
    for k in w_full:
        assert torch.equal(w_fast[k], w_full[k]), f"{k} differs after the update"
    assert is_on_policy(PolicyConfig(mini_batches=1, epochs=1))


@pytest.mark.parametrize("mini_batches, epochs", [(2, 1), (1, 2)])
def test_old_pass_is_not_skipped_off_policy(group_of_one, random_batch, mini_batches, epochs):
    from fastprime.trainer.config import PolicyConfig
    from fastprime.trainer.policy import is_on_policy

    assert not is_on_policy(PolicyConfig(mini_batches=mini_batches, epochs=epochs))
    tok = build_tokenizer()
    batch = random_batch(len(tok))
    adv = torch.zeros(batch.mask.shape)
    model = shard_model(build_tiny_model(tok, seed=0), device=group_of_one.device)
    with pytest.raises(ValueError, match="old_logp=None needs epochs=1 and mini_batches=1"):
        policy_pass(
            model, torch.optim.SGD(model.parameters(), lr=0.0), batch, None, adv, group_of_one, ref_logp=None,
            mini_batches=mini_batches, epochs=epochs, loss_agg="token-mean", clip_low=0.2, clip_high=0.2,
            dual_clip=None, kl_coef=0.0, entropy_coef=0.0, temperature=1.0, max_norm=1e9,
        )  # fmt: skip
