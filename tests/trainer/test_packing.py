"""Packed micro-batches: planning invariants, and packed log-probs equal per-sequence and padded ones."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fastprime.kernels import linear_logprobs
from fastprime.trainer import attention as packed_attention
from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.models import HeadlessLM
from fastprime.trainer.packing import (
    bin_by_budget,
    pack,
    packed_length,
    plan_micro_batches,
    prompt_groups,
    rank_micro_batches,
)


def _random_batch(n, *, vocab, seed, k=1):
    """n random sequences; with k > 1, in groups of k that share a prompt (as a rollout's samples do)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(6, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(-(-n // k))
    ]
    prompts = [p for p in prompts for _ in range(k)][:n]
    responses = [
        torch.randint(6, vocab, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]
    return prompts, responses


def test_pack_layout_by_hand():
    mb = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], [0, 1])
    assert mb.input_ids.tolist() == [[1, 2, 3, 5, 4, 7, 8]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert mb.pos.tolist() == [2, 3, 4, 5, 6]  # the rows whose hidden state predicts each response token
    assert mb.head_targets.tolist() == [5, 6, 7, 8, 9]
    assert mb.head_seq_ids.tolist() == [0, 0, 1, 1, 1]
    assert mb.rows.tolist() == [0, 0, 1, 1, 1] and mb.cols.tolist() == [0, 1, 0, 1, 2]
    padded = torch.zeros(2, 3)
    mb.head_to_padded(torch.arange(5, dtype=torch.float32), padded)
    assert padded.tolist() == [[0, 1, 0], [2, 3, 4]]
    assert mb.head_from_padded(padded).tolist() == [0, 1, 2, 3, 4]


def test_shared_prompt_layout_by_hand():
    # sequences 0, 2 and 3 share prompt [1, 2]; sequence 3's one-token response needs no input of its own
    prompts, responses = [[1, 2], [9], [1, 2], [1, 2]], [[5, 6, 7], [8, 4], [3, 4], [6]]
    mb = pack(prompts, responses, [0, 1, 2, 3])
    assert mb.input_ids.tolist() == [[1, 2, 5, 6, 3, 9, 8]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    assert mb.pos.tolist() == [1, 2, 3, 1, 4, 1, 5, 6]  # prompt's last row (1) once per response
    assert mb.head_targets.tolist() == [5, 6, 7, 3, 4, 6, 8, 4]
    assert mb.head_seq_ids.tolist() == [0, 0, 0, 2, 2, 3, 1, 1]
    assert mb.rows.tolist() == [0, 0, 0, 2, 2, 3, 1, 1] and mb.cols.tolist() == [0, 1, 2, 0, 1, 0, 0, 1]
    assert packed_attention.segments_from_positions(mb.position_ids) == [(4, 0), (1, 2), (2, 0)]
    alone = pack(prompts, responses, [0, 1, 2, 3], share_prompts=False)
    assert alone.num_tokens == 4 + 2 + 3 + 2 and mb.num_tokens == 7


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 4])
def test_plan_covers_every_sequence_once_within_budget(world, k):
    prompts, responses = _random_batch(23, vocab=30, seed=world, k=k)
    seqs = list(range(3, 23))
    plan = plan_micro_batches(prompts, responses, seqs, token_budget=25, world_size=world)
    assert len(plan) == world and len({len(p) for p in plan}) == 1, (
        "every rank must run the same number of passes"
    )
    flat = [i for p in plan for mb in p for i in mb]
    assert sorted(flat) == seqs

    def packed(mb):  # tokens pack() lays out: each distinct prompt once
        return sum(
            len(prompts[g[0]]) + sum(len(responses[i]) - 1 for i in g) for g in prompt_groups(prompts, mb)
        )

    assert all(packed(mb) == pack(prompts, responses, mb).num_tokens <= 25 for p in plan for mb in p if mb)
    loads = [sum(packed(mb) for mb in p if mb) for p in plan]
    longest = max(packed_length(prompts, responses, [i]) for i in seqs)
    assert max(loads) - min(loads) <= 2 * longest, f"unbalanced rank loads {loads}"
    if k > 1 and world == 1:  # groups stay together where the budget allows
        assert sum(packed(mb) for mb in plan[0]) < sum(packed_length(prompts, responses, [i]) for i in seqs)


def test_plan_rejects_sequence_over_budget():
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens"):
        plan_micro_batches([[1], [1, 2, 3]], [[4, 5, 6], [4, 5, 6, 7, 8, 9, 10]], [0, 1], token_budget=8)
    with pytest.raises(ValueError, match="9 packed tokens"):
        bin_by_budget([3, 9], 8)


def test_filler_micro_batches_pad_short_ranks():
    prompts, responses = [[1, 2]] * 3, [[3, 4, 5]] * 3
    mbs = [
        rank_micro_batches(prompts, responses, [0, 1, 2], token_budget=4, rank=r, world_size=2)
        for r in range(2)
    ]
    assert len(mbs[0]) == len(mbs[1]) == 2
    assert [mb.filler for mb in mbs[0]] == [False, False] and [mb.filler for mb in mbs[1]] == [False, True]


@pytest.mark.parametrize(
    "attn,share",
    [("sdpa", False), ("eager", False), (packed_attention.NAME, False), (packed_attention.NAME, True)],
)
def test_packed_logprobs_equal_per_sequence_and_padded(attn, share):
    """Packing must not let tokens attend across sequences: compare with each sequence alone and a padded batch.
    transformers' own sdpa/eager read sequence bounds from positions restarting at 0 (no shared prompts); the
    trainer's backend also reads responses that continue a shared prompt."""
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0).eval()
    packed_lm = copy.deepcopy(lm)
    packed_lm.config._attn_implementation = (
        packed_attention.register() if attn == packed_attention.NAME else attn
    )
    prompts, responses = _random_batch(9, vocab=len(tok), seed=1, k=3)
    n, T = len(prompts), max(map(len, responses))

    mbs = rank_micro_batches(prompts, responses, list(range(n)), token_budget=40, share_prompts=share)
    assert any(len(mb.seqs) > 1 for mb in mbs), "the test must pack several sequences together"
    if share:
        assert any(len(g) > 1 for mb in mbs for g in prompt_groups(prompts, mb.seqs)), "and share a prompt"
    packed = torch.zeros(n, T)
    model = HeadlessLM(packed_lm)
    with torch.no_grad():
        for mb in mbs:
            logp = model(
                mb.input_ids,
                mb.position_ids,
                lambda h, w, b, mb=mb: linear_logprobs(h, w, mb.head_targets),
                mb.pos,
            )
            mb.head_to_padded(logp, packed)

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
