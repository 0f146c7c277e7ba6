"""prm_pass against an eager per-sequence reference: q alignment with the response tokens, labels per sequence,
and the `after` order (each mini-batch's q comes from the forward before that mini-batch's optimizer step)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.models import full_state_dict, shard_model
from fastprime.trainer.passes import Batch, Dist, chunks, logprob_pass, prm_pass

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


def _seq_logp(lm, p: list[int], r: list[int]) -> torch.Tensor:
    logits = lm(input_ids=torch.tensor([p + r]), use_cache=False).logits[0, len(p) - 1 : -1].double()
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None])[:, 0]


def _eager_after(prm_lm, ref_lm, batch: Batch, mini_batches: int):
    """The `after` order by hand: per mini-batch, q from the current PRM, then one SGD step on its BCE."""
    prm_lm = copy.deepcopy(prm_lm).double()
    opt = torch.optim.SGD(prm_lm.parameters(), lr=LR)
    q = torch.zeros(batch.mask.shape, dtype=torch.float64)
    losses = []
    for seqs in chunks(batch.n, mini_batches):
        scores = []
        for i in seqs:
            p, r = batch.prompts[i], batch.responses[i]
            with torch.no_grad():
                ref = _seq_logp(copy.deepcopy(ref_lm).double(), p, r)
            qi = _seq_logp(prm_lm, p, r) - ref
            q[i, : len(r)] = qi.detach()
            scores.append(BETA * qi.sum())
        loss = F.binary_cross_entropy_with_logits(torch.stack(scores), batch.acc[seqs].double())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return q, sum(losses) / len(losses), prm_lm.state_dict()


@pytest.mark.parametrize("budget", [4096, 16])
def test_prm_pass_after_equals_eager_reference(group_of_one, budget):
    tok = build_tokenizer()
    ref_lm, prm_lm = build_tiny_model(tok, seed=0), build_tiny_model(tok, seed=1)  # q != 0 from the start
    batch = _batch(len(tok))
    d = Dist(rank=0, world=1, device=group_of_one.device, token_budget=budget)
    ref = shard_model(copy.deepcopy(ref_lm), trainable=False, device=d.device)
    ref_logp, _ = logprob_pass(ref, batch, d, temperature=1.0)
    prm = shard_model(copy.deepcopy(prm_lm), device=d.device)
    opt = torch.optim.SGD(prm.parameters(), lr=LR)
    res = prm_pass(
        prm, opt, batch, ref_logp, d, mini_batches=2, beta=BETA, temperature=1.0, max_norm=1e9, update=True
    )
    q_ref, loss_ref, sd_ref = _eager_after(prm_lm, ref_lm, batch, 2)

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
                _seq_logp(prm_lm.double(), batch.prompts[i], batch.responses[i])
                - _seq_logp(ref_lm.double(), batch.prompts[i], batch.responses[i])
                for i in second
            ]
        )
    q_second = torch.cat([q_ref[i, : len(batch.responses[i])] for i in second])
    assert (q_second - q_start).abs().max() > 1e-3
