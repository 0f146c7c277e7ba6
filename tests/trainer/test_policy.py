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


T, LR = 0.7, 0.1


def _eager_policy_update(lm, ref_lm, batch, old, adv, *, mode, epochs, kl_coef, entropy_coef, dual_clip):
    """The PPO update by hand in fp64: per-sequence HF logits / T -> log_softmax, clipped surrogate (dual clip for
    A < 0), k3 KL to the reference, entropy bonus, `mode`'s weights over the whole batch (one mini-batch), SGD.
    Log-ratios are clamped to [-20, 20] as the spec says (verl does the same so that exp cannot overflow)."""
    lm = copy.deepcopy(lm).double()
    ref_lm = copy.deepcopy(ref_lm).double()
    opt = torch.optim.SGD(lm.parameters(), lr=LR)
    lengths = [len(r) for r in batch.responses]
    losses = []

    def logp_and_entropy(model, p, r):
        logits = model(input_ids=torch.tensor([p + r]), use_cache=False).logits[0, len(p) - 1 : -1] / T
        lp = torch.log_softmax(logits, -1)
        return lp.gather(-1, torch.tensor(r)[:, None])[:, 0], -(lp.exp() * lp).sum(-1)

    for _ in range(epochs):
        loss = torch.zeros((), dtype=torch.float64)
        for i, (p, r) in enumerate(zip(batch.prompts, batch.responses)):
            n = len(r)
            logp, ent = logp_and_entropy(lm, p, r)
            with torch.no_grad():
                ref, _ = logp_and_entropy(ref_lm, p, r)
            a, o = adv[i, :n].double(), old[i, :n].double()
            ratio = torch.exp((logp - o).clamp(-20, 20))
            pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - 0.2, 1 + 0.25))
            if dual_clip is not None:
                pg = torch.where(a < 0, torch.minimum(pg, -dual_clip * a), pg)
            u = (ref - logp).clamp(-20, 20)
            kl = torch.exp(u) - u - 1
            term = pg + kl_coef * kl - entropy_coef * ent
            if mode == "token-mean":
                w = 1.0 / sum(lengths)
            elif mode == "seq-mean-token-mean":
                w = 1.0 / n / batch.n
            else:
                w = 1.0 / batch.n
            loss = loss + w * term.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return sum(losses) / len(losses), lm.state_dict()


@pytest.mark.parametrize(
    "mode, kl_coef, entropy_coef, dual_clip",
    [
        ("token-mean", 0.3, 0.05, 3.0),
        ("seq-mean-token-mean", 0.0, 0.0, None),
        ("seq-mean-token-sum", 0.3, 0.0, 1.5),
        ("seq-mean-token-mean", 0.0, 0.2, None),
    ],
    ids=["token-mean-kl-ent-dual", "seq-mean-token-mean", "seq-mean-token-sum-kl-dual", "entropy-only"],
)
def test_policy_pass_equals_eager_fp64_reference(
    group_of_one, random_batch, mode, kl_coef, entropy_coef, dual_clip
):
    """The policy pass (packed micro-batches, fused PPO head, temperature 0.7) against a per-sequence eager fp64
    PPO update: same loss and, through SGD, same gradient. old log-probs are offset by noise so that ratios
    start away from 1 and the clip, dual clip, KL and entropy terms all act in the first step."""
    tok = build_tokenizer()
    lm, ref_lm = build_tiny_model(tok, seed=0), build_tiny_model(tok, seed=1)
    batch = random_batch(len(tok))
    mask = batch.mask
    g = torch.Generator().manual_seed(5)
    d = Dist(rank=0, world=1, device=group_of_one.device, token_budget=16)  # several micro-batches
    model = shard_model(copy.deepcopy(lm), device=d.device)
    ref = shard_model(copy.deepcopy(ref_lm), trainable=False, device=d.device)
    logp, _ = logprob_pass(model, batch, d, temperature=T)
    ref_logp, _ = logprob_pass(ref, batch, d, temperature=T)
    old = (logp + 0.4 * torch.randn(mask.shape, generator=g)) * mask
    adv = torch.randn(mask.shape, generator=g) * mask
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    res = policy_pass(
        model, opt, batch, old, adv, d, ref_logp=ref_logp, mini_batches=1, epochs=2, loss_agg=mode, clip_low=0.2,
        clip_high=0.25, dual_clip=dual_clip, kl_coef=kl_coef, entropy_coef=entropy_coef, temperature=T,
        max_norm=1e9,
    )  # fmt: skip
    loss_ref, sd_ref = _eager_policy_update(
        lm, ref_lm, batch, old, adv, mode=mode, epochs=2, kl_coef=kl_coef, entropy_coef=entropy_coef,
        dual_clip=dual_clip,
    )  # fmt: skip
    assert res.loss == pytest.approx(loss_ref, abs=2e-5), f"loss {res.loss} vs eager {loss_ref}"
    assert res.stats["clip_frac_low"] + res.stats["clip_frac_high"] > 0.05, res.stats  # the clip is exercised
    sd, start = full_state_dict(model), lm.state_dict()
    moved = max(float((sd_ref[k] - start[k].double()).abs().max()) for k in sd)
    assert moved > 1e-3, f"the eager update barely moved the weights ({moved})"
    for k, v in sd.items():
        torch.testing.assert_close(
            v.double(), sd_ref[k], atol=5e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}"
        )


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


def _on_policy_run(lm, batch, d, adv, *, skip: bool, mini_batches: int = 1, epochs: int = 1):
    """One update from `lm`: (the policy phase's metrics, weights after, logprob-phase stats, old log-probs, the
    policy pass's own forward log-probs)."""
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
    res, stats = policy_phase(model, opt, batch, lp, adv, d, config=cfg, temperature=1.0)
    return stats, full_state_dict(model), lp_stats, lp.old, res.logp


def test_on_policy_skip_of_the_old_pass_gives_identical_numbers(group_of_one, random_batch):
    """One epoch, one mini-batch: the skipped old pass gives bit-identical loss, stats and updated weights."""
    from fastprime.trainer.config import PolicyConfig
    from fastprime.trainer.policy import is_on_policy

    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0)
    batch = random_batch(len(tok))
    adv = torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(5)) * batch.mask
    d = Dist(rank=0, world=1, device=group_of_one.device, token_budget=32)  # several micro-batches
    assert (
        _on_policy_run(lm, batch, d, adv, skip=True)[4] is None
    )  # no engine log-probs: nothing to compare with
    batch.sample_logprobs = [[0.0] * len(r) for r in batch.responses]  # as the vllm engine reports them
    full, w_full, st_full, old, no_logp = _on_policy_run(lm, batch, d, adv, skip=False)
    fast, w_fast, st_fast, none, forward_logp = _on_policy_run(lm, batch, d, adv, skip=True)
    assert old is not None and none is None and no_logp is None
    # what the skipped pass would have given, for the rollout engine's agreement check (vllm)
    torch.testing.assert_close(forward_logp, old, atol=1e-6, rtol=0)
    assert bool((forward_logp[batch.mask == 0] == 0).all())
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
