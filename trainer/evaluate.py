"""Held-out evaluation: greedy decoding of each prompt once, graded by the real outcome verifier."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fastprime.trainer.decode import decode, greedy_token

if TYPE_CHECKING:
    from fastprime.trainer.verifiers import VerifierPool


@torch.no_grad()
def greedy_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy completions of chat `prompts` (each a list of messages), decoded without special tokens.

    `model` is an HF model, or a rollout engine with `greedy(prompt_ids, max_new_tokens=)` (the vllm engine).

    Prompts go through the tokenizer's chat template with the generation prompt; an HF model decodes them in
    batches of `batch_size` through decode.py's loop (argmax, at most `max_new_tokens`, stopping at EOS), in
    eval mode for the call, its previous mode restored after.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if hasattr(model, "greedy"):  # a rollout engine rather than an HF model
        return _engine_greedy_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    was_training = model.training
    model.eval()
    ids = _prompt_ids(tokenizer, prompts)
    eos = [tokenizer.eos_token_id]
    out: list[list[int]] = []
    try:
        for i in range(0, len(ids), batch_size):
            out += [
                r.response_ids
                for r in decode(
                    model,
                    ids[i : i + batch_size],
                    n=1,
                    max_new_tokens=max_new_tokens,
                    eos_token_ids=eos,
                    pad_token_id=tokenizer.pad_token_id,
                    pick=greedy_token,
                )  # fmt: skip
            ]
    finally:
        model.train(was_training)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]]) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _engine_greedy_responses(
    engine, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int
) -> list[str]:
    """The same prompts (same chat template, same token ids) through a rollout engine's `greedy`; the engine
    schedules its own batches and stops at its EOS ids."""
    out = engine.greedy(_prompt_ids(tokenizer, prompts), max_new_tokens=max_new_tokens)
    return tokenizer.batch_decode([r.response_ids for r in out], skip_special_tokens=True)


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    *,
    max_new_tokens: int,
    batch_size: int,
    verifier: VerifierPool,
) -> float:
    """Mean verifier score of one greedy response per PRIME/verl row (`prompt`, `ability`, `reward_model`).

    A response the verifier fails on (error, timeout) scores 0 and is counted by the verifier, so a broken
    answer lowers the accuracy instead of stopping the evaluation.
    """
    if not rows:
        raise ValueError("greedy_accuracy needs at least one row, got an empty list")
    responses = greedy_responses(
        model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    items = [
        {"ability": r["ability"], "response": resp, "ground_truth": r["reward_model"]["ground_truth"]}
        for r, resp in zip(rows, responses)
    ]
    scores = verifier.score(items).scores
    return float(sum(scores)) / len(scores)
