"""The packed log-prob pass equals log_softmax of each sequence's own HF logits."""

import copy

import torch
import torch.nn.functional as F

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
