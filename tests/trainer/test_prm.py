"""The implicit PRM (prm.py): token rewards and pairwise accuracy against hand-computed values, the PRM
pass against an eager per-sequence reference. prm_pass against an eager per-sequence reference: q alignment with the response tokens, labels per sequence,
and the `after` order (each mini-batch's q comes from the forward before that mini-batch's optimizer step)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fastprime.trainer.batch import Batch
from fastprime.trainer.config import PRMConfig
from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.models import full_state_dict, shard_model
from fastprime.trainer.passes import Dist, chunks, logprob_pass
from fastprime.trainer.prm import (
    prm_pairwise_accuracy,
    prm_pass,
    prm_phase,
    process_reward_stats,
    process_token_rewards,
)

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


def test_process_reward_stats():
    rewards = torch.tensor([[1.0, 2.0, NAN], [-1.0, NAN, NAN], [0.5, 0.5, 2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    stats = process_reward_stats(rewards, mask, torch.tensor([1.0, 0.0, 0.6]))
    # sums per response 3, -1, 3; six valid tokens summing to 5
    assert stats == pytest.approx(
        {
            "process/token_mean": 5 / 6,
            "process/seq_sum_mean": 5 / 3,
            "process/seq_sum_correct_mean": 3.0,
            "process/seq_sum_wrong_mean": -1.0,
        }
    )
    only_wrong = process_reward_stats(rewards, mask, torch.zeros(3))
    assert "process/seq_sum_correct_mean" not in only_wrong
    with pytest.raises(ValueError, match="acc has 2 entries"):
        process_reward_stats(rewards, mask, torch.zeros(2))


BETA, LR = 0.7, 0.5


def _batch(vocab: int) -> Batch:
    g = torch.Generator().manual_seed(11)
    prompts, responses = [], []
    for _ in range(3):
        p = torch.randint(6, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(2):
            prompts.append(p)
            n = int(torch.randint(1, 10, (1,), generator=g))
            responses.append(torch.randint(6, vocab, (n,), generator=g).tolist())
    acc = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    return Batch(
        prompts=prompts, responses=responses, acc=acc, truncated=torch.zeros(6, dtype=torch.bool), k=2
    )


def _seq_logp(lm, p: list[int], r: list[int], temperature: float = 1.0, scale=1.0) -> torch.Tensor:
    logits = lm(input_ids=torch.tensor([p + r]), use_cache=False).logits[0, len(p) - 1 : -1].double()
    return F.log_softmax(scale * logits / temperature, -1).gather(-1, torch.tensor(r)[:, None])[:, 0]


def _eager_after(prm_lm, ref_lm, batch: Batch, mini_batches: int, temperature: float = 1.0, scale=None):
    """The `after` order by hand: per mini-batch, q from the current PRM, then one SGD step on its BCE.
    scale: a logit scale s (prm.logit_scale_lr), log pi_prm = log_softmax(s * logits), stepped with the weights."""
    prm_lm = copy.deepcopy(prm_lm).double()
    params = list(prm_lm.parameters())
    if scale is not None:
        scale = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
        params.append(scale)
    opt = torch.optim.SGD(params, lr=LR)
    q = torch.zeros(batch.mask.shape, dtype=torch.float64)
    losses = []
    for seqs in chunks(batch.n, mini_batches):
        scores = []
        for i in seqs:
            p, r = batch.prompts[i], batch.responses[i]
            with torch.no_grad():
                ref = _seq_logp(copy.deepcopy(ref_lm).double(), p, r, temperature)
            qi = _seq_logp(prm_lm, p, r, temperature, 1.0 if scale is None else scale) - ref
            q[i, : len(r)] = qi.detach()
            scores.append(BETA * qi.sum())
        loss = F.binary_cross_entropy_with_logits(torch.stack(scores), batch.acc[seqs].double())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    if scale is not None:
        return q, sum(losses) / len(losses), prm_lm.state_dict(), float(scale.detach())
    return q, sum(losses) / len(losses), prm_lm.state_dict()


@pytest.mark.parametrize("budget, T", [(4096, 1.0), (16, 0.6)])
def test_prm_pass_after_equals_eager_reference(group_of_one, budget, T):
    tok = build_tokenizer()
    ref_lm, prm_lm = build_tiny_model(tok, seed=0), build_tiny_model(tok, seed=1)  # q != 0 from the start
    batch = _batch(len(tok))
    d = Dist(rank=0, world=1, device=group_of_one.device, token_budget=budget)
    ref = shard_model(copy.deepcopy(ref_lm), trainable=False, device=d.device)
    ref_logp, _ = logprob_pass(ref, batch, d, temperature=T)
    prm = shard_model(copy.deepcopy(prm_lm), device=d.device)
    opt = torch.optim.SGD(prm.parameters(), lr=LR)
    res = prm_pass(
        prm, opt, batch, ref_logp, d, mini_batches=2, beta=BETA, temperature=T, max_norm=1e9, update=True
    )
    q_ref, loss_ref, sd_ref = _eager_after(prm_lm, ref_lm, batch, 2, T)

    torch.testing.assert_close(res.q.double(), q_ref, atol=5e-5, rtol=0)
    assert res.loss == pytest.approx(loss_ref, abs=1e-5)
    sd = full_state_dict(prm)
    for k, v in sd.items():
        torch.testing.assert_close(
            v.double(), sd_ref[k], atol=5e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}"
        )
    # The second mini-batch's q must come from the PRM after the first step: with the start weights it differs.
    second = chunks(batch.n, 2)[1]
    with torch.no_grad():
        q_start = torch.cat(
            [
                _seq_logp(prm_lm.double(), batch.prompts[i], batch.responses[i], T)
                - _seq_logp(ref_lm.double(), batch.prompts[i], batch.responses[i], T)
                for i in second
            ]
        )
    q_second = torch.cat([q_ref[i, : len(batch.responses[i])] for i in second])
    assert (q_second - q_start).abs().max() > 1e-3


def test_prm_logit_scale_is_applied_and_trained_like_eager_reference(group_of_one):
    """prm.logit_scale_lr: log pi_prm = log_softmax(s * logits) with s a trained scalar; q, loss, the stepped
    weights and the stepped s all equal the eager fp64 computation (s starts at 1.3 here so that it matters)."""
    tok = build_tokenizer()
    ref_lm, prm_lm = build_tiny_model(tok, seed=0), build_tiny_model(tok, seed=1)
    batch = _batch(len(tok))
    d = Dist(rank=0, world=1, device=group_of_one.device, token_budget=16)
    ref = shard_model(copy.deepcopy(ref_lm), trainable=False, device=d.device)
    ref_logp, _ = logprob_pass(ref, batch, d, temperature=1.0)
    prm = shard_model(copy.deepcopy(prm_lm), device=d.device, logit_scale=True)
    with torch.no_grad():
        prm.logit_scale.fill_(1.3)
    opt = torch.optim.SGD(prm.parameters(), lr=LR)
    res = prm_pass(
        prm, opt, batch, ref_logp, d, mini_batches=2, beta=BETA, temperature=1.0, max_norm=1e9, update=True
    )
    q_ref, loss_ref, sd_ref, scale_ref = _eager_after(prm_lm, ref_lm, batch, 2, scale=1.3)

    torch.testing.assert_close(res.q.double(), q_ref, atol=5e-5, rtol=0)
    assert res.loss == pytest.approx(loss_ref, abs=1e-5)
    for k, v in full_state_dict(prm).items():
        if k != "logit_scale":
            torch.testing.assert_close(
                v.double(), sd_ref[k], atol=5e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}"
            )
    assert abs(scale_ref - 1.3) > 1e-3  # the scale's gradient is not negligible here
    assert float(prm.logit_scale.detach()) == pytest.approx(scale_ref, abs=1e-5)


def test_prm_update_before_takes_rewards_from_the_updated_prm(group_of_one):
    """prm.update='before' (prm_phase, as train_step calls it) at temperature 0.6: the loss and update are the
    `after` pass's, and the rewards are q of the PRM *after* its update (eager fp64: the updated weights' q),
    not the q the loss was computed with. norm='none', granularity='token' make the rewards q itself."""
    T = 0.6
    tok = build_tokenizer()
    ref_lm, prm_lm = build_tiny_model(tok, seed=0), build_tiny_model(tok, seed=1)
    batch = _batch(len(tok))
    d = Dist(rank=0, world=1, device=group_of_one.device, token_budget=16)
    ref = shard_model(copy.deepcopy(ref_lm), trainable=False, device=d.device)
    ref_logp, _ = logprob_pass(ref, batch, d, temperature=T)
    prm = shard_model(copy.deepcopy(prm_lm), device=d.device)
    opt = torch.optim.SGD(prm.parameters(), lr=LR)
    cfg = PRMConfig(
        update="before", beta=BETA, grad_clip=1e9, mini_batches=2, granularity="token", norm="none"
    )
    (rewards, skipped), stats = prm_phase(prm, opt, batch, ref_logp, d, config=cfg, temperature=T)

    q_during, loss_ref, sd_ref = _eager_after(prm_lm, ref_lm, batch, 2, T)
    updated = build_tiny_model(tok, seed=1).double()
    updated.load_state_dict(sd_ref)
    q_after = torch.zeros(batch.mask.shape, dtype=torch.float64)
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(batch.prompts, batch.responses)):
            q_after[i, : len(r)] = _seq_logp(updated, p, r, T) - _seq_logp(ref_lm.double(), p, r, T)
    assert skipped == 0 and stats["prm/loss"] == pytest.approx(loss_ref, abs=1e-5)
    torch.testing.assert_close(rewards.double(), q_after, atol=5e-5, rtol=1e-4)  # |q| up to ~3: fp32 noise
    assert (q_after - q_during).abs().max() > 1e-3, (
        "the update must change q for this test to tell the orders apart"
    )


def test_logit_scale_gets_its_own_learning_rate_and_no_weight_decay():
    """train._adamw: Adam's first step moves each parameter by lr * sign(grad) (bias-corrected moments), so with a
    gradient of +2 on s = 1 the scale must land on 1 - 3e-2 exactly (no decay toward 0), the body weights by
    1e-4 (times their decay)."""
    from fastprime.trainer.models import HeadlessLM
    from fastprime.trainer.train import _adamw

    model = HeadlessLM(build_tiny_model(build_tokenizer(), seed=0), logit_scale=True)
    opt = _adamw(model, lr=1e-4, weight_decay=0.1, logit_scale_lr=3e-2)
    w = model.lm.model.norm.weight
    w_before = w.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.logit_scale.grad.fill_(2.0)
    w.grad.fill_(-1.0)
    opt.step()
    assert float(model.logit_scale.detach()) == pytest.approx(1.0 - 3e-2, abs=1e-6)
    expected = w_before * (1 - 1e-4 * 0.1) + 1e-4  # decoupled decay, then -lr * sign(-1)
    torch.testing.assert_close(w.detach(), expected, atol=1e-7, rtol=0)
