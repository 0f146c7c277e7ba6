"""Greedy evaluation: a hand-built model whose greedy output is known, and batched vs one-by-one decoding."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from fastprime.trainer.demo import build_tiny_model, build_tokenizer, make_arithmetic_rows
from fastprime.trainer.evaluate import greedy_accuracy, greedy_responses
from fastprime.trainer.verifiers import VerifierPool

TOK = build_tokenizer()
ANSWER = "\\boxed{7}"


def bigram_model(successor: dict[str, str]) -> Qwen2ForCausalLM:
    """A Qwen2 whose next token depends only on the current one: `successor[tok]`, else EOS.

    Attention and MLP outputs are zeroed, so the final hidden state is the normalised embedding of the
    current token; embeddings are one-hot and lm_head row y scores the tokens whose successor is y.
    """
    V, D = len(TOK), 64
    cfg = Qwen2Config(
        vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False, pad_token_id=TOK.pad_token_id,
        eos_token_id=TOK.eos_token_id,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, :V].copy_(torch.eye(V))
        ids = TOK.convert_tokens_to_ids
        for x in range(V):
            y = (
                ids(successor[TOK.convert_ids_to_tokens(x)])
                if TOK.convert_ids_to_tokens(x) in successor
                else TOK.eos_token_id
            )
            model.lm_head.weight[y, x] = 1.0
    return model


# From the generation prompt: "\boxed{7}" then EOS (the "}" has no successor entry, so EOS follows).
CHAIN = {
    "<|assistant|>": "\\",
    "\\": "b",
    "b": "o",
    "o": "x",
    "x": "e",
    "e": "d",
    "d": "{",
    "{": "7",
    "7": "}",
}


def _row(problem: str, gold: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": problem}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": gold},
    }


def test_greedy_responses_of_a_known_model_with_mixed_prompt_lengths():
    model = bigram_model(CHAIN)
    prompts = [[{"role": "user", "content": p}] for p in ("1", "(12+3)*4-5", "3+4")]
    assert greedy_responses(model, TOK, prompts, max_new_tokens=20, batch_size=2) == [ANSWER] * 3
    # The budget cuts the answer: 5 new tokens are "\boxe".
    assert greedy_responses(model, TOK, prompts, max_new_tokens=5, batch_size=3) == ["\\boxe"] * 3


def test_batched_greedy_matches_one_prompt_at_a_time_full_forward():
    """Left padding must not change what a prompt decodes to: compare with a no-cache argmax loop per prompt."""
    model = build_tiny_model(TOK, seed=5)
    with torch.no_grad():  # sharpen the random model so argmax ties cannot flip between the two paths
        model.lm_head.weight.mul_(30.0)
    prompts = [r["prompt"] for r in make_arithmetic_rows(5, seed=1)]
    batched = greedy_responses(model, TOK, prompts, max_new_tokens=12, batch_size=5)
    for prompt, got in zip(prompts, batched):
        ids = TOK.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([TOK(ids, add_special_tokens=False)["input_ids"]])
        out = []
        with torch.no_grad():
            for _ in range(12):
                nxt = model(input_ids=ids).logits[0, -1].argmax().item()
                if nxt == TOK.eos_token_id:
                    break
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert got == TOK.decode(out, skip_special_tokens=True)
    assert model.training  # the mode is restored


def test_bad_arguments():
    model = bigram_model(CHAIN)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_responses(model, TOK, [[{"role": "user", "content": "1"}]], max_new_tokens=0, batch_size=1)
    with pytest.raises(ValueError, match="empty"):
        greedy_accuracy(model, TOK, [], max_new_tokens=4, batch_size=1, verifier=None)


def test_greedy_accuracy_hand_checked_with_the_real_verifier():
    model = bigram_model(CHAIN)
    # The model always answers \boxed{7}: right for golds "7" and "7.0", wrong for the others -> 2 of 5.
    rows = [_row("3+4", "7"), _row("2*5", "10"), _row("9-2", "7.0"), _row("1+1", "2"), _row("(1+2)*3", "9")]
    with VerifierPool(workers=1) as pool:
        assert greedy_accuracy(
            model, TOK, rows, max_new_tokens=20, batch_size=2, verifier=pool
        ) == pytest.approx(2 / 5)
        # Cut before the closing brace, no answer is complete: 0.
        assert greedy_accuracy(model, TOK, rows, max_new_tokens=7, batch_size=5, verifier=pool) == 0.0
