"""Only the response positions' hidden rows go into the fused head (issue 11 item 4): the losses, log-probs and
gradients equal those of the head over every packed row with ignored targets at prompt positions."""

import copy

import torch

from fastprime.kernels import aggregation_weights, linear_logprobs, linear_ppo_loss, linear_prm_loss
from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.models import HeadlessLM
from fastprime.trainer.packing import rank_micro_batches


def _run(lm, mb, head_of, compact: bool):
    """(output, {param name: grad}) of one forward+backward; head_of(mb, compact) builds the head function."""
    model = HeadlessLM(copy.deepcopy(lm))
    out = model(mb.input_ids, mb.position_ids, head_of(mb, compact), mb.pos if compact else None)
    loss = (out.logp + 0.3 * out.entropy).sum() if hasattr(out, "entropy") else out[0]
    loss.backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _per_token(mb, compact: bool, padded: torch.Tensor) -> torch.Tensor:
    """[M] at the head rows, or [N] over every packed row (0 off the response positions)."""
    return mb.head_from_padded(padded) if compact else _all_rows(mb, mb.head_from_padded(padded), 0)


def _all_rows(mb, values: torch.Tensor, fill) -> torch.Tensor:
    """[N] with the head rows' values at their packed positions (unique without shared prompts), `fill` elsewhere."""
    out = torch.full((mb.num_tokens,), fill, dtype=values.dtype)
    out[mb.pos] = values
    return out


def test_response_rows_only_equal_all_rows(random_batch):
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=3)
    batch = random_batch(len(tok))
    # without shared prompts every head row is a distinct packed position, so "every row" is well defined
    mb = rank_micro_batches(
        batch.prompts, batch.responses, list(range(batch.n)), token_budget=4096, share_prompts=False
    )[0]
    assert mb.head_targets.numel() < mb.num_tokens, "the prompts must add rows the head can skip"
    targets, seq_ids = _all_rows(mb, mb.head_targets, -100), _all_rows(mb, mb.head_seq_ids, -1)
    g = torch.Generator().manual_seed(0)
    old, adv, ref = (torch.randn(batch.mask.shape, generator=g) * batch.mask for _ in range(3))
    labels = batch.acc

    def ppo(mb, compact):
        tgt, sid, mask = (
            (mb.head_targets, mb.head_seq_ids, mb.head_mask)
            if compact
            else (targets, seq_ids, targets != -100)
        )
        w = aggregation_weights(mask, sid, "seq-mean-token-mean")
        o, a, r = (_per_token(mb, compact, x) for x in (old, adv, ref))
        return lambda h, wt, b: linear_ppo_loss(
            h, wt, tgt, o - 0.1, a, w, ref_logp=r, kl_coef=0.05, entropy_coef=0.01, bias=b
        )

    def prm(mb, compact):
        tgt, sid = (mb.head_targets, mb.head_seq_ids) if compact else (targets, seq_ids)
        r = _per_token(mb, compact, ref)
        return lambda h, wt, b: linear_prm_loss(h, wt, tgt, r, sid, labels, beta=0.5, bias=b)

    def logprobs(mb, compact):
        tgt = mb.head_targets if compact else targets
        return lambda h, wt, b: linear_logprobs(h, wt, tgt, bias=b, temperature=0.8, return_entropy=True)

    for name, head_of in (("ppo", ppo), ("prm", prm), ("logprobs", logprobs)):
        (full, g_full), (fast, g_fast) = _run(lm, mb, head_of, False), _run(lm, mb, head_of, True)
        if name == "ppo":
            torch.testing.assert_close(fast[0], full[0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(fast[1].logp, full[1].logp[mb.pos], atol=1e-6, rtol=1e-5)
        elif name == "prm":
            torch.testing.assert_close(fast[0], full[0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(fast[1], full[1][mb.pos], atol=1e-6, rtol=1e-5)
        else:
            torch.testing.assert_close(fast.logp, full.logp[mb.pos], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(fast.entropy, full.entropy[mb.pos], atol=1e-6, rtol=1e-5)
        assert g_fast.keys() == g_full.keys()
        for k in g_full:
            torch.testing.assert_close(
                g_fast[k], g_full[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k, name=name: f"{name} {k}: {m}"
            )
