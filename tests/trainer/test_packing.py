"""Packed micro-batches: planning invariants, and packed log-probs equal per-sequence and padded ones."""

import pytest
import torch
import torch.nn.functional as F

from fastprime.kernels import linear_logprobs
from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.models import HeadlessLM
from fastprime.trainer.packing import (
    IGNORE_INDEX,
    bin_by_budget,
    pack,
    plan_micro_batches,
    rank_micro_batches,
    sequence_lengths,
)


def _random_batch(n, *, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(6, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]
    responses = [
        torch.randint(6, vocab, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]
    return prompts, responses


def test_pack_layout_by_hand():
    mb = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], [0, 1])
    assert mb.input_ids.tolist() == [[1, 2, 3, 5, 4, 7, 8]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    I = IGNORE_INDEX
    assert mb.targets.tolist() == [I, I, 5, 6, 7, 8, 9]
    assert mb.seq_ids.tolist() == [-1, -1, 0, 0, 1, 1, 1]
    assert mb.rows.tolist() == [0, 0, 1, 1, 1] and mb.cols.tolist() == [0, 1, 0, 1, 2]
    padded = torch.zeros(2, 3)
    mb.to_padded(torch.arange(7, dtype=torch.float32), padded)
    assert padded.tolist() == [[2, 3, 0], [4, 5, 6]]
    assert mb.from_padded(padded).tolist() == [0, 0, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_covers_every_sequence_once_within_budget(world):
    prompts, responses = _random_batch(23, vocab=30, seed=world)
    lengths = sequence_lengths(prompts, responses)
    seqs = list(range(3, 23))
    plan = plan_micro_batches(lengths, seqs, token_budget=25, world_size=world)
    assert len(plan) == world and len({len(p) for p in plan}) == 1, (
        "every rank must run the same number of passes"
    )
    flat = [i for p in plan for mb in p for i in mb]
    assert sorted(flat) == seqs
    assert all(sum(lengths[i] for i in mb) <= 25 for p in plan for mb in p)
    loads = [sum(lengths[i] for mb in p for i in mb) for p in plan]
    assert max(loads) - min(loads) <= max(lengths), f"unbalanced rank loads {loads}"


def test_plan_rejects_sequence_over_budget():
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens"):
        bin_by_budget([3, 9], [0, 1], 8)


def test_filler_micro_batches_pad_short_ranks():
    prompts, responses = [[1, 2]] * 3, [[3, 4, 5]] * 3
    mbs = [
        rank_micro_batches(prompts, responses, [0, 1, 2], token_budget=4, rank=r, world_size=2)
        for r in range(2)
    ]
    assert len(mbs[0]) == len(mbs[1]) == 2
    assert [mb.filler for mb in mbs[0]] == [False, False] and [mb.filler for mb in mbs[1]] == [False, True]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logprobs_equal_per_sequence_and_padded(attn):
    """Packing must not let tokens attend across sequences: compare with each sequence alone and a padded batch."""
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0).eval()
    lm.config._attn_implementation = attn
    prompts, responses = _random_batch(5, vocab=len(tok), seed=1)
    n, T = len(prompts), max(map(len, responses))

    mbs = rank_micro_batches(prompts, responses, list(range(n)), token_budget=40)
    assert any(len(mb.seqs) > 1 for mb in mbs), "the test must pack several sequences together"
    packed = torch.zeros(n, T)
    model = HeadlessLM(lm)
    with torch.no_grad():
        for mb in mbs:
            logp = model(
                mb.input_ids, mb.position_ids, lambda h, w, b, mb=mb: linear_logprobs(h, w, mb.targets)
            )
            mb.to_padded(logp, packed)

        alone = torch.zeros(n, T)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            x = torch.tensor([p + r])
            logits = lm(input_ids=x, use_cache=False).logits[0, len(p) - 1 : -1].double()
            alone[i, : len(r)] = F.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None])[:, 0].float()

        L = max(len(p) + len(r) for p, r in zip(prompts, responses))
        ids = torch.full((n, L), tok.pad_token_id)
        att = torch.zeros(n, L, dtype=torch.long)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            att[i, : len(p) + len(r)] = 1
        logits = lm(input_ids=ids, attention_mask=att, use_cache=False).logits.double()
        padded = torch.zeros(n, T)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            lp = F.log_softmax(logits[i, len(p) - 1 : len(p) + len(r) - 1], -1)
            padded[i, : len(r)] = lp.gather(-1, torch.tensor(r)[:, None])[:, 0].float()

    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=0, msg=lambda m: f"packed vs alone: {m}")
    torch.testing.assert_close(packed, padded, atol=2e-5, rtol=0, msg=lambda m: f"packed vs padded: {m}")
