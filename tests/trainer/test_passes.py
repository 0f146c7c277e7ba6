"""The packed log-prob pass equals log_softmax of each sequence's own HF logits."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fastprime.trainer import attention
from fastprime.trainer.batch import Batch
from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.models import shard_model
from fastprime.trainer.passes import Dist, logprob_pass


def test_old_logprobs_equal_hf_logits(group_of_one, random_batch):
    """logprob_pass on packed micro-batches equals log_softmax of each sequence's own HF logits."""
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=1)
    batch = random_batch(len(tok))
    d = Dist(rank=0, world=1, device=group_of_one.device, token_budget=24)
    logp, ent = logprob_pass(
        shard_model(copy.deepcopy(lm), trainable=False, device=d.device), batch, d, temperature=0.7
    )
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(batch.prompts, batch.responses)):
            logits = (
                lm(input_ids=torch.tensor([p + r]), use_cache=False).logits[0, len(p) - 1 : -1].double() / 0.7
            )
            lp = F.log_softmax(logits, -1)
            torch.testing.assert_close(
                logp[i, : len(r)].double(), lp.gather(-1, torch.tensor(r)[:, None])[:, 0], atol=2e-5, rtol=0
            )
            torch.testing.assert_close(ent[i, : len(r)].double(), -(lp.exp() * lp).sum(-1), atol=2e-5, rtol=0)
            assert (logp[i, len(r) :] == 0).all()


def _many_sequences(vocab: int, n: int = 18) -> Batch:
    g = torch.Generator().manual_seed(11)
    rand = lambda lo, hi: torch.randint(
        6, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g
    )
    prompts = [p for p in (rand(3, 9).tolist() for _ in range(n // 2)) for _ in range(2)]  # groups share one
    responses = [rand(2, 12).tolist() for _ in range(n)]
    return Batch(prompts, responses, torch.zeros(n), torch.zeros(n, dtype=torch.bool), k=2)


@pytest.mark.parametrize("group_mask", [True, False])
def test_packed_attention_logprobs_equal_each_sequence_alone(group_of_one, monkeypatch, group_mask):
    """The trainer's packed attention (no dense mask; groups sharing a prompt in one call with a group mask, or
    one call per segment) equals each sequence run alone by HF sdpa."""
    if not group_mask:
        monkeypatch.setattr(attention, "GROUP_MASK_MAX_TOKENS", 0)
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=2)
    batch = _many_sequences(len(tok))
    d = Dist(
        rank=0, world=1, device=group_of_one.device, token_budget=4096
    )  # one micro-batch of 18 sequences
    model = shard_model(copy.deepcopy(lm), trainable=False, device=d.device)
    assert model.lm.config._attn_implementation == attention.NAME and lm.config._attn_implementation == "sdpa"
    logp, _ = logprob_pass(model, batch, d, temperature=1.0)
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(batch.prompts, batch.responses)):
            logits = lm(input_ids=torch.tensor([p + r]), use_cache=False).logits[0, len(p) - 1 : -1].double()
            want = F.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None])[:, 0]
            torch.testing.assert_close(logp[i, : len(r)].double(), want, atol=2e-5, rtol=0)
