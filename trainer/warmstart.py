"""Supervised warm start: teach a fresh model the answer format before RL, stopped by measured accuracy.

RL from a model that never answers correctly gets no signal, and from one that is nearly always correct has
little to gain, so the warm start trains on worked solutions until held-out greedy accuracy enters a target
window. Accuracy during this training rises abruptly (7% -> 21% -> 42% within ~200 steps on the demo task,
shared/docs/demo-notes.md), so a fixed step count lands anywhere; `max_steps` and `max_seconds` only guard.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fastprime.kernels import linear_logprobs
from fastprime.trainer.config import WarmStartConfig
from fastprime.trainer.evaluate import greedy_accuracy

if TYPE_CHECKING:
    from fastprime.trainer.verifiers import VerifierPool

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclass
class WarmStartResult:
    """What the warm start did: steps taken, the last measured accuracy, wall time and the eval history."""

    steps: int
    acc: float
    seconds: float
    loss: float = float("nan")
    """Mean per-token loss of the last optimizer step."""
    in_window: bool = False
    """Whether the last accuracy is inside [target_acc_lo, target_acc_hi]."""
    history: list[dict] = field(default_factory=list)
    """One {"step", "acc", "loss", "seconds"} per evaluation."""


def tokenize_sft_rows(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> list[tuple[list[int], int]]:
    """Each row -> (ids of chat prompt + solution + EOS, number of prompt tokens); only the rest is trained."""
    out = []
    for i, row in enumerate(rows):
        try:
            prompt, solution = row["prompt"], row["extra_info"]["solution"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"warm-start row {i} needs prompt and extra_info.solution, got {row!r}") from err
        prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
        if not isinstance(prompt_ids, list):  # transformers 5 returns a BatchEncoding here
            prompt_ids = prompt_ids["input_ids"]
        answer_ids = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((list(prompt_ids) + answer_ids, len(prompt_ids)))
    return out


def sft_batch(
    examples: list[tuple[list[int], int]], *, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids [B, T], attention_mask [B, T], targets [B, T-1]) with only answer tokens kept.

    targets[b, t] is the token at t+1 when it is part of the answer (solution or EOS), else IGNORE_INDEX.
    Right padding keeps position ids 0..len-1 without passing them.
    """
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)
    targets = torch.full((len(examples), T - 1), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(examples):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
        targets[b, n_prompt - 1 : len(ids) - 1] = input_ids[b, n_prompt : len(ids)]
    return input_ids, attention_mask, targets


def sft_loss(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Scalar mean negative log-likelihood of the kept targets [B, T-1] (input_ids, attention_mask [B, T]).

    Never materialises `.logits`: the body (`model.model`) gives hidden [B, T, D] and `linear_logprobs`
    goes from hidden and the lm_head weight [V, D] straight to per-token log-probs.
    """
    hidden = model.model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    logp = linear_logprobs(h, model.lm_head.weight, flat_targets, ignore_index=IGNORE_INDEX)
    n_tokens = (flat_targets != IGNORE_INDEX).sum().clamp(min=1)
    return -logp.sum() / n_tokens


def warm_start(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: list[dict],
    eval_rows: list[dict],
    *,
    config: WarmStartConfig,
    verifier: VerifierPool | None = None,
) -> WarmStartResult:
    """Train `model` in place on the train rows' worked solutions until held-out greedy accuracy >= lo.

    Every `config.eval_every` steps, `greedy_accuracy` on `eval_rows` (graded by `verifier`, or by a
    VerifierPool opened for the call when None) decides whether to stop; `max_steps` / `max_seconds` stop it
    regardless. An evaluation also runs at the end if the last step was not evaluated, so `acc` is always
    the accuracy of the returned weights.
    """
    if not train_rows or not eval_rows:
        raise ValueError(f"warm start needs train and eval rows, got {len(train_rows)} and {len(eval_rows)}")
    if verifier is None:
        from fastprime.trainer.verifiers import VerifierPool

        with VerifierPool() as pool:
            return warm_start(model, tokenizer, train_rows, eval_rows, config=config, verifier=pool)

    examples = tokenize_sft_rows(tokenizer, train_rows)
    rng = random.Random(config.seed)
    order: list[int] = []
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    device = next(model.parameters()).device
    history: list[dict] = []
    t0 = time.perf_counter()
    step, loss_value, acc = 0, float("nan"), 0.0

    def evaluate() -> float:
        acc = greedy_accuracy(
            model, tokenizer, eval_rows, max_new_tokens=config.max_new_tokens,
            batch_size=config.eval_batch_size, verifier=verifier,
        )  # fmt: skip
        history.append({"step": step, "acc": acc, "loss": loss_value, "seconds": time.perf_counter() - t0})
        logger.info("warm start step %d: loss %.4f, held-out greedy acc %.3f", step, loss_value, acc)
        return acc

    was_training = model.training
    model.train()
    last_eval_step = -1
    while step < config.max_steps and time.perf_counter() - t0 < config.max_seconds:
        batch = [examples[i] for i in _next_rows(order, rng, len(examples), config.batch_size)]
        input_ids, attention_mask, targets = (
            t.to(device) for t in sft_batch(batch, pad_id=tokenizer.pad_token_id)
        )
        loss = sft_loss(model, input_ids, attention_mask, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        sched.step()
        step += 1
        loss_value = loss.item()
        if step % config.eval_every == 0:
            acc, last_eval_step = evaluate(), step
            if acc >= config.target_acc_lo:
                break
    if last_eval_step != step:
        acc = evaluate()
    _warn_outside_window(acc, config, step)
    model.train(was_training)
    in_window = config.target_acc_lo <= acc <= config.target_acc_hi
    seconds = time.perf_counter() - t0
    return WarmStartResult(step, acc, seconds, loss=loss_value, in_window=in_window, history=history)


def _next_rows(order: list[int], rng: random.Random, n_rows: int, batch_size: int) -> list[int]:
    """The next batch of row indices from `order` (consumed), reshuffling all rows at each epoch's end."""
    if len(order) < batch_size:  # leftover rows of an epoch start the next one
        fresh = list(range(n_rows))
        rng.shuffle(fresh)
        order.extend(fresh)
    rows = order[:batch_size]
    del order[:batch_size]
    return rows


def _warn_outside_window(acc: float, config: WarmStartConfig, step: int) -> None:
    if acc > config.target_acc_hi:
        logger.warning(
            "warm start overshot: accuracy jumped to %.3f, above target_acc_hi %.3f, at step %d",
            acc, config.target_acc_hi, step,
        )  # fmt: skip
    elif acc < config.target_acc_lo:
        logger.warning(
            "warm start stopped by its guard at step %d with accuracy %.3f < target_acc_lo %.3f",
            step, acc, config.target_acc_lo,
        )  # fmt: skip
