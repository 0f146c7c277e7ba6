"""The fused head on a Hugging Face causal LM: run the model's body, then log-probs or the PPO loss without logits.

`model(input_ids).logits` holds a [tokens x vocab] tensor (fp32 for Qwen2.5-0.5B with 16K tokens: 9.3 GiB, plus
as much again for its gradient). These calls run only the body (`model.base_model`, e.g. `Qwen2Model`), take the
final hidden states of the positions that have a target, and hand them with `lm_head.weight` (and bias) to
`linear_logprobs` / `linear_ppo_loss`, which never hold more than one chunk of logits.

Targets are aligned with the input: `targets[..., t]` is the token that position t predicts (the next input token
for teacher forcing), `ignore_index` where nothing is scored (prompt, padding, the last position). For a padded
batch whose response starts at column P: `targets[:, P-1:-1] = input_ids[:, P:]`, masked where the response is
padding. Packed input is one row `[1, N]` with `position_ids` restarting at 0 for every sequence and no
attention_mask (transformers then keeps attention inside each sequence).

Architectures that transform the logits after the head are read from the config (the fields trl 1.16's own fused
head reads): a constant logit scale (Cohere `logit_scale`, `output_multiplier`, Falcon-H1 `lm_head_multiplier`,
Granite/MiniCPM3/HyperCLOVA X `logits_scaling`) folds into the temperature;
Gemma-2/3 `final_logit_softcapping` is refused (the kernels have no tanh cap). Needs torch only (the model
object comes from transformers); `import fastprime.kernels` does not load this module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastprime.kernels import linear_logprobs, linear_ppo_loss

__all__ = ["causal_lm_logprobs", "causal_lm_ppo_loss", "completion_targets", "head_logit_scale"]


def head_logit_scale(model: nn.Module) -> float:
    """The constant the architecture multiplies its logits by after the head (1.0 for most models).

    Raises ValueError for a logit transform the fused head cannot reproduce (soft-capping), naming the field.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(
            f"{type(model).__name__} soft-caps its logits (config.final_logit_softcapping={softcap}); the fused head "
            "has no tanh cap, set final_logit_softcapping=None only if the model was trained without it"
        )
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale = float(config.logit_scale)
    elif getattr(config, "output_multiplier", None) is not None:  # logits * output_multiplier
        scale = float(config.output_multiplier)
    elif getattr(config, "lm_head_multiplier", None) is not None:  # Falcon-H1: logits * lm_head_multiplier
        scale = float(config.lm_head_multiplier)
    elif (
        getattr(config, "logits_scaling", None) is not None
    ):  # Granite, MiniCPM3 divide; HyperCLOVA X multiplies
        multiplies = getattr(config, "model_type", "") == "hyperclovax"
        scale = float(config.logits_scaling) if multiplies else 1.0 / float(config.logits_scaling)
    if not scale > 0.0:
        raise ValueError(
            f"{type(model).__name__}'s logit scale must be > 0 to fold into the temperature, got {scale}"
        )
    return scale


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The causal LM's body (decoder without the head) and its output projection."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear output projection (get_output_embeddings() gave "
            f"{type(head).__name__}); pass a causal LM such as AutoModelForCausalLM"
        )
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError(f"{type(model).__name__} exposes no body under base_model (its base_model_prefix)")
    return body, head


def _head_inputs(
    model: nn.Module,
    input_ids: Tensor,
    targets: Tensor,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    ignore_index: int,
) -> tuple[Tensor, Tensor, nn.Linear, Tensor]:
    """Run the body -> (hidden [M, D] of the M scored positions, their targets [M], head, scored mask [B, T])."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T] (packed: [1, N]), got shape {tuple(input_ids.shape)}")
    if targets.shape != input_ids.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
        )
    for name, x in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if x is not None and x.shape != input_ids.shape:
            raise ValueError(
                f"{name} shape {tuple(x.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
    body, head = _body_and_head(model)
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    scored = targets != ignore_index
    hidden = out.last_hidden_state[scored]
    if hidden.dtype != head.weight.dtype:  # autocast runs the body in bf16 while fp32 weights stay fp32
        hidden = hidden.to(head.weight.dtype)
    return hidden, targets[scored], head, scored


def _scatter(values: Tensor, scored: Tensor) -> Tensor:
    """Per-scored-position values [M] -> [B, T] with 0 at unscored positions (differentiable)."""
    return values.new_zeros(scored.shape).masked_scatter(scored, values)


def causal_lm_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    targets: Tensor,
    *,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs (and entropy) of `targets` under an HF causal LM, without [B, T, V] logits.

    Args:
        model: a transformers causal LM (e.g. Qwen2ForCausalLM); its body runs with use_cache=False.
        input_ids: [B, T] padded or [1, N] packed; targets: [B, T] int, aligned as in the module docstring.
        attention_mask: [B, T] or None; position_ids: [B, T] or None (packed: restart at 0 per sequence).
        temperature: divides the logits (after the architecture's own logit scale).
    Returns fp32 logp [B, T] (or `LogprobsEntropy(logp, entropy)`, both [B, T]), 0 where targets == ignore_index;
    differentiable w.r.t. the model's parameters. Equals, in exact arithmetic,
        z = model(input_ids, attention_mask=..., position_ids=...).logits.float() / temperature
        logp = z.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]  (masked to 0 at ignored)
    """
    temperature = temperature / head_logit_scale(model)
    hidden, tgt, head, scored = _head_inputs(
        model, input_ids, targets, attention_mask, position_ids, ignore_index
    )
    out = linear_logprobs(
        hidden, head.weight, tgt, bias=head.bias, temperature=temperature, ignore_index=ignore_index,
        return_entropy=return_entropy, impl=impl,
    )  # fmt: skip
    if return_entropy:
        return out._replace(logp=_scatter(out.logp, scored), entropy=_scatter(out.entropy, scored))
    return _scatter(out, scored)


def causal_lm_ppo_loss(
    model: nn.Module,
    input_ids: Tensor,
    targets: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    w: Tensor,
    *,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    ref_logp: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    **ppo_options: Any,
) -> tuple[Tensor, Any]:
    """`linear_ppo_loss` on an HF causal LM: the body runs, then the clipped PPO loss straight from the head.

    input_ids, targets, attention_mask, position_ids as in `causal_lm_logprobs`; old_logp, advantages, w,
    ref_logp: [B, T] like targets (only scored positions are read). old_logp=None means on-policy (the ratio is 1
    with gradient ∇logp, like `logp - logp.detach()`): old_logp is then the head's own log-probs from one extra
    no-grad pass of the fused head over the same hidden states (the body does not run again). ppo_options: the keyword options of
    `linear_ppo_loss` (clip_low, clip_high, dual_clip, kl_coef, entropy_coef, impl).
    Returns (loss 0-dim fp32 differentiable w.r.t. the model's parameters, PPOStats with logp [B, T]).
    """
    for name, x in (("old_logp", old_logp), ("advantages", advantages), ("w", w), ("ref_logp", ref_logp)):
        if x is not None and x.shape != targets.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} must equal targets shape {tuple(targets.shape)}")
    for name in ("bias", "hidden", "weight"):
        if name in ppo_options:
            raise ValueError(f"{name}= is taken from the model; do not pass it to causal_lm_ppo_loss")
    temperature = temperature / head_logit_scale(model)
    hidden, tgt, head, scored = _head_inputs(
        model, input_ids, targets, attention_mask, position_ids, ignore_index
    )
    pick = lambda x: None if x is None else x[scored]
    old = pick(old_logp)
    if old is None:  # the same kernel on the same inputs as inside linear_ppo_loss: the ratio is exactly 1
        with torch.no_grad():
            old = linear_logprobs(
                hidden, head.weight, tgt, bias=head.bias, temperature=temperature, ignore_index=ignore_index,
                return_entropy=True, impl=ppo_options.get("impl", "auto"),
            ).logp  # fmt: skip
    loss, stats = linear_ppo_loss(
        hidden, head.weight, tgt, old, pick(advantages), pick(w), ref_logp=pick(ref_logp),
        temperature=temperature, bias=head.bias, ignore_index=ignore_index, **ppo_options,
    )  # fmt: skip
    return loss, stats._replace(logp=_scatter(stats.logp, scored))


def completion_targets(
    prompt_len: int, completion_ids: Tensor, completion_mask: Tensor, ignore_index: int = -100
) -> Tensor:
    """Targets [B, P + C] for prompts [B, P] (left-padded) followed by completions [B, C], both int.

    Position P - 1 + j predicts completion token j; masked completion tokens and every other position get
    ignore_index. Per-token tensors [B, C] align the same way with `F.pad(x, (P - 1, 1))`.
    """
    tgt = completion_ids.masked_fill(completion_mask == 0, ignore_index)
    return torch.nn.functional.pad(tgt, (prompt_len - 1, 1), value=ignore_index)
