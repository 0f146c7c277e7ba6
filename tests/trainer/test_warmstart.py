"""Supervised warm start: targets, the fused-head loss against HF's logits, loss going down, stop rules."""

import pytest
import torch
import torch.nn.functional as F

from fastprime.trainer.config import WarmStartConfig
from fastprime.trainer.demo import build_tiny_model, build_tokenizer, make_arithmetic_rows
from fastprime.trainer.verifiers import VerifierPool
from fastprime.trainer.warmstart import (
    IGNORE_INDEX,
    sft_batch,
    sft_loss,
    tokenize_sft_rows,
    warm_start,
)

TOK = build_tokenizer()
X = IGNORE_INDEX


def test_sft_batch_keeps_only_answer_targets_and_pads_right():
    ids, mask, targets = sft_batch([([11, 12, 13, 14, 15], 3), ([21, 22, 23], 2)], pad_id=0)
    assert ids.tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # Position t predicts token t+1; the first answer token is predicted from the last prompt token.
    assert targets.tolist() == [[X, X, 14, 15], [X, 23, X, X]]


def test_tokenized_rows_end_with_eos_and_split_at_the_generation_prompt():
    row = make_arithmetic_rows(1, seed=0)[0]
    ((ids, n_prompt),) = tokenize_sft_rows(TOK, [row])
    assert TOK.decode(ids[:n_prompt]) == "<|user|>" + row["prompt"][0]["content"] + "<|assistant|>"
    assert TOK.decode(ids[n_prompt:]) == row["extra_info"]["solution"] + "<|eos|>"
    with pytest.raises(ValueError, match="row 0"):
        tokenize_sft_rows(TOK, [{"prompt": row["prompt"]}])


def test_fused_loss_equals_cross_entropy_on_hf_logits():
    model = build_tiny_model(TOK, seed=0)
    examples = tokenize_sft_rows(TOK, make_arithmetic_rows(6, seed=2))
    ids, mask, targets = sft_batch(examples, pad_id=TOK.pad_token_id)
    loss = sft_loss(model, ids, mask, targets)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=X)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def _verifier():
    return VerifierPool(workers=1)


def test_a_few_steps_reduce_the_loss_and_the_guard_stops_them():
    model = build_tiny_model(TOK, seed=0)
    train = make_arithmetic_rows(128, seed=0)
    held_out = make_arithmetic_rows(4, seed=0, split="test")
    probe = sft_batch(tokenize_sft_rows(TOK, train[:32]), pad_id=TOK.pad_token_id)
    with torch.no_grad():
        before = sft_loss(model, *probe).item()
    # target_acc_lo = 1.0 cannot be reached by a fresh model, so only max_steps stops it.
    cfg = WarmStartConfig(lr=3e-3, warmup_steps=2, batch_size=8, max_steps=10, eval_every=100, target_acc_lo=1.0,
                          target_acc_hi=1.0, max_new_tokens=4, eval_batch_size=4)  # fmt: skip
    with _verifier() as pool:
        result = warm_start(model, TOK, train, held_out, config=cfg, verifier=pool)
    with torch.no_grad():
        after = sft_loss(model, *probe).item()
    assert result.steps == 10 and not result.in_window
    assert [h["step"] for h in result.history] == [10]  # the final evaluation of the returned weights
    assert after < before - 0.5, (before, after)


def test_stops_at_the_first_evaluation_inside_the_window():
    model = build_tiny_model(TOK, seed=0)
    train = make_arithmetic_rows(64, seed=0)
    held_out = make_arithmetic_rows(3, seed=0, split="test")
    # Any accuracy is >= 0, so the first evaluation (step 3) stops the run.
    cfg = WarmStartConfig(batch_size=4, max_steps=50, eval_every=3, target_acc_lo=0.0, target_acc_hi=1.0,
                          max_new_tokens=2, eval_batch_size=3)  # fmt: skip
    with _verifier() as pool:
        result = warm_start(model, TOK, train, held_out, config=cfg, verifier=pool)
    assert result.steps == 3 and result.in_window and len(result.history) == 1
    assert result.acc == result.history[0]["acc"]
