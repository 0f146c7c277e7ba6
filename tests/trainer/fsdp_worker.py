"""One PRIME update (PRM 'after' update + PPO) on a fixed batch; run under torchrun by test_fsdp.py.

Usage: torchrun --nproc_per_node W tests/trainer/fsdp_worker.py OUT.pt TOKEN_BUDGET
Rank 0 saves the losses, the reference/old log-probs, q, and the full updated policy and PRM weights.
"""

import copy
import sys

import torch

from fastprime.trainer.advantages import compute_advantages
from fastprime.trainer.batch import Batch
from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.models import full_state_dict, init_distributed, shard_model
from fastprime.trainer.passes import Dist, logprob_pass
from fastprime.trainer.policy import policy_pass
from fastprime.trainer.prm import prm_pass, process_token_rewards


def fixed_batch(vocab: int, *, groups: int = 4, k: int = 4) -> Batch:
    g = torch.Generator().manual_seed(123)
    prompts, responses = [], []
    for _ in range(groups):
        p = torch.randint(6, vocab, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist()
        for _ in range(k):
            prompts.append(p)
            responses.append(
                torch.randint(6, vocab, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g).tolist()
            )
    acc = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    return Batch(
        prompts=prompts, responses=responses, acc=acc, truncated=torch.zeros(16, dtype=torch.bool), k=k
    )


def main() -> None:
    out, budget = sys.argv[1], int(sys.argv[2])
    rank, world, device = init_distributed()
    d = Dist(rank=rank, world=world, device=device, token_budget=budget)
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0)
    batch = fixed_batch(len(tok))
    mask = batch.mask
    ref = shard_model(copy.deepcopy(lm), trainable=False, device=device)
    prm = shard_model(copy.deepcopy(lm), device=device, logit_scale=True)  # a root parameter of shape [1]
    policy = shard_model(lm, device=device)
    # SGD: the updated weights are then a linear function of the gradients, so comparing them compares gradients
    # (Adam's first step, ~lr * sign(g), would amplify summation-order noise where g is near 0).
    prm_opt = torch.optim.SGD(prm.parameters(), lr=0.5)
    pol_opt = torch.optim.SGD(policy.parameters(), lr=0.5)

    old_logp, _ = logprob_pass(policy, batch, d, temperature=1.0)
    ref_logp, _ = logprob_pass(ref, batch, d, temperature=1.0)
    prm_res = prm_pass(
        prm,
        prm_opt,
        batch,
        ref_logp,
        d,
        mini_batches=2,
        beta=0.05,
        temperature=1.0,
        max_norm=10.0,
        update=True,
    )
    rewards = process_token_rewards(prm_res.q, mask)
    adv = compute_advantages(batch.acc, rewards, mask, k=batch.k)
    pol_res = policy_pass(
        policy, pol_opt, batch, old_logp, adv.advantages, d, ref_logp=ref_logp, mini_batches=2, epochs=1,
        loss_agg="seq-mean-token-mean", clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0,
        entropy_coef=0.0, temperature=1.0, max_norm=1.0,
    )  # fmt: skip
    policy_sd, prm_sd = full_state_dict(policy), full_state_dict(prm)
    if rank == 0:
        torch.save(
            {
                "old_logp": old_logp, "ref_logp": ref_logp, "q": prm_res.q, "prm_loss": prm_res.loss,
                "prm_grad_norm": prm_res.grad_norm, "policy_loss": pol_res.loss, "policy_grad_norm": pol_res.grad_norm,
                "policy": {k: v.cpu() for k, v in policy_sd.items()}, "prm": {k: v.cpu() for k, v in prm_sd.items()},
            },
            out,
        )  # fmt: skip
    # Leave together: a rank that tears gloo down while its peer is still busy (rank 0 saving) aborted
    # ("terminate called without an active exception") in about 1 of 10 runs.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
