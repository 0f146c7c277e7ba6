"""decode_attention.py: grouped-query attention over the KV cache as stored, against an fp64 eager reference
(keys and values repeated per query head, masked softmax); and the HF rollout engine's sampled tokens and
per-step logits with it equal transformers' own sdpa generation."""

import pytest
import torch
from transformers import GenerationConfig

from fastprime.trainer import decode_attention
from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.rollout import HFRolloutEngine


class _Layer(torch.nn.Module):  # what transformers' attention functions read from the calling module
    num_key_value_groups = 2
    is_causal = True


def _reference(q, k, v, mask, scale):
    """fp64: every query head h attends with key/value head h // G under a boolean or additive mask."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
        )
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_grouped_query_attention_equals_fp64_reference(q_len, mask_kind):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, d = 3, 4, 2, 9, 8
    q, k, v = (torch.randn(B, h, n, d, generator=g) for h, n in ((H, q_len), (Hkv, L), (Hkv, L)))
    # left padding (row b starts at b) and causal over the last q_len positions
    keep = (torch.arange(L)[None, None, :] >= torch.arange(B)[:, None, None]) & (
        torch.arange(L)[None, None, :] <= torch.arange(L - q_len, L)[None, :, None]
    )
    mask = {"bool": keep[:, None], "additive": torch.where(keep, 0.0, -1e9)[:, None], "none": None}[mask_kind]
    if mask is None and q_len > 1:
        expect_mask = torch.ones(q_len, q_len, dtype=torch.bool).tril()[None, None]  # sdpa's is_causal
        k, v = k[:, :, :q_len], v[:, :, :q_len]
    else:
        expect_mask = mask
    out, _ = decode_attention.grouped_query_attention(_Layer(), q, k, v, mask, scaling=0.3)
    assert out.shape == (B, q_len, H, d)
    torch.testing.assert_close(out.double(), _reference(q, k, v, expect_mask, 0.3), atol=2e-6, rtol=1e-5)


def test_engine_generates_what_sdpa_generates():
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0)
    eng = HFRolloutEngine(
        lm, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, max_new_tokens=12
    )
    assert eng.model.config._attn_implementation == decode_attention.NAME
    assert lm.config._attn_implementation == "sdpa"  # the policy itself is untouched
    prompts = [tok("<|user|>12+7=<|assistant|>")["input_ids"], tok("<|user|>3=<|assistant|>")["input_ids"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    attn = (ids != tok.pad_token_id).long()
    gc = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                          eos_token_id=[tok.eos_token_id], output_logits=True, return_dict_in_generate=True)  # fmt: skip
    runs = []
    for model in (lm, eng.model):
        torch.manual_seed(3)
        with torch.no_grad():
            runs.append(
                model.generate(
                    input_ids=ids, attention_mask=attn, generation_config=gc, num_return_sequences=3
                )
            )
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
