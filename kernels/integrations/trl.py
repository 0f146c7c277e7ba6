"""`FusedGRPOTrainer`: trl.GRPOTrainer whose log-probs and GRPO/BNPO/Dr.GRPO/DAPO losses run on fastprime's head.

Same constructor as `trl.GRPOTrainer` (pinned: trl 1.16; it overrides two of its internal methods). Two methods
change, nothing else:
- `_get_per_token_logps_and_entropies` (old and reference log-probs, no grad): `causal_lm_logprobs`.
- `_compute_loss`: `causal_lm_ppo_loss` with TRL's aggregation written as per-token weights w, so the loss is
  `Σ_t w_t (max(-A r, -A clip(r, 1 - ε_low, 1 + ε_high)) + β k3_t)`, exactly TRL's per-token formula; r = 1 when TRL
  passes no old log-probs (on-policy), its value taken from one extra forward of the fused head (no body rerun).
Neither builds the [tokens x vocab] logits. Every TRL option that changes the per-token loss in a way the fused
epilogue cannot express is refused at construction with the option's name (see `unsupported_options`).
Differences from TRL that remain: log ratios and ref - logp are clamped to ±20 before exp (verl's guard; TRL does not
clamp); metrics log the means of clip fractions, KL and entropy, not TRL's per-sequence min/max clip fractions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from torch import Tensor
from trl import GRPOTrainer

from fastprime.kernels import aggregation_weights
from fastprime.kernels.hf import causal_lm_logprobs, causal_lm_ppo_loss, completion_targets, head_logit_scale

__all__ = ["FusedGRPOTrainer", "SUPPORTED_LOSS_TYPES", "unsupported_options"]

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# Inputs of multimodal models; the fused path runs text-only bodies.
_MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes", "token_type_ids",
    "mm_token_type_ids", "image_position_ids", "num_images", "num_tiles",
)  # fmt: skip


def unsupported_options(trainer: GRPOTrainer) -> list[str]:
    """The settings of a constructed GRPOTrainer that FusedGRPOTrainer cannot honour, each with its fix."""
    args, problems = trainer.args, []
    if trainer.loss_type not in SUPPORTED_LOSS_TYPES:
        problems.append(f"loss_type={trainer.loss_type!r} (supported: {', '.join(SUPPORTED_LOSS_TYPES)})")
    if trainer.importance_sampling_level != "token":
        problems.append(f"importance_sampling_level={trainer.importance_sampling_level!r} (only 'token')")
    if args.delta is not None:
        problems.append(f"delta={args.delta} (two-sided clipping; use None)")
    if trainer.beta != 0.0 and args.use_bias_correction_kl:
        problems.append(
            "use_bias_correction_kl=True with beta != 0 (the fused KL term is plain k3; set it False)"
        )
    if trainer.off_policy_mask_threshold is not None:
        problems.append(f"off_policy_mask_threshold={trainer.off_policy_mask_threshold} (use None)")
    if trainer.top_entropy_quantile < 1.0:
        problems.append(f"top_entropy_quantile={trainer.top_entropy_quantile} (use 1.0)")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        problems.append(
            f"entropy_coef={args.entropy_coef}, use_adaptive_entropy={args.use_adaptive_entropy} (TRL normalises the "
            "entropy bonus apart from the policy loss; use 0.0 and False)"
        )
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        problems.append("vllm_importance_sampling_correction=True with use_vllm (set it False)")
    if trainer.aux_loss_enabled:
        problems.append(f"router_aux_loss_coef={trainer.router_aux_loss_coef} (MoE aux loss; set 0.0)")
    if args.cast_lm_head_to_fp32:
        problems.append(
            "cast_lm_head_to_fp32=True (the fused head already computes logits in fp32; set False)"
        )
    if is_peft_model(trainer.model):
        problems.append("peft_config (PEFT models are not supported yet)")
    if trainer.accelerator.num_processes > 1:
        problems.append(
            f"{trainer.accelerator.num_processes} processes (the body is called outside the DDP/FSDP/DeepSpeed "
            "wrapper's forward, which would skip its gradient hooks; single process only)"
        )
    model = trainer.accelerator.unwrap_model(trainer.model)
    if model.config.get_text_config() is not model.config:
        problems.append(f"the multimodal model {type(model).__name__} (text-only causal LMs)")
    try:
        head_logit_scale(model)
    except ValueError as err:
        problems.append(str(err))
    return problems


class FusedGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with fastprime's fused lm_head for log-probs and loss; same constructor and behaviour."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        problems = unsupported_options(self)
        if problems:
            raise ValueError("FusedGRPOTrainer cannot honour: " + "; ".join(problems))

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal,
    ) -> tuple[Tensor, Tensor | None, None]:  # fmt: skip
        """TRL's contract: completion log-probs [B, C] (and entropies [B, C]) of input_ids [B, P + C]."""
        given = [k for k, v in multimodal.items() if v is not None]
        if compute_aux_loss or given:
            raise ValueError(
                f"FusedGRPOTrainer runs text-only models; got {given or 'compute_aux_loss=True'}"
            )
        model = self.accelerator.unwrap_model(model)
        P = input_ids.size(1) - logits_to_keep
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for ids, mask in zip(input_ids.split(batch_size), attention_mask.split(batch_size)):
            targets = completion_targets(P, ids[:, P:], mask[:, P:])
            with self.accelerator.autocast():
                out = causal_lm_logprobs(
                    model,
                    ids,
                    targets,
                    attention_mask=mask,
                    temperature=self.temperature,
                    return_entropy=True,
                )
            logps.append(out.logp[:, P - 1 : -1])
            entropies.append(out.entropy[:, P - 1 : -1])
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    def _token_weights(self, mask: Tensor, inputs: dict, mode: str) -> Tensor:
        """TRL's aggregation of `per_token_loss * mask` for self.loss_type as weights w [B, C]."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        B = mask.size(0)
        if self.loss_type == "grpo":  # mean over sequences of each sequence's token mean
            return aggregation_weights(mask, mode="seq-mean-token-mean", num_seqs=B * accumulation)
        if self.loss_type == "bnpo":  # token mean over this micro-batch
            num_tokens = mask.sum().clamp(min=1.0) * accumulation
        elif self.loss_type == "dr_grpo":  # a constant: B x max_completion_length
            num_tokens = B * self.max_completion_length * accumulation
        else:  # dapo: tokens of the whole generation batch, per process and accumulation window
            num_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_tokens = num_tokens * accumulation / self.args.steps_per_generation
        return aggregation_weights(mask, mode="token-mean", num_tokens=num_tokens)

    def _compute_loss(self, model, inputs) -> Tensor:
        given = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
        if given:
            raise ValueError(f"FusedGRPOTrainer runs text-only models; the batch has {given}")
        model = self.accelerator.unwrap_model(model)
        P = inputs["prompt_ids"].size(1)
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mode = "train" if self.model.training else "eval"
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1).expand_as(mask)
        # Per-token [B, C] tensors move to the positions that predict them in the [B, P + C] input.
        at_inputs = lambda x: None if x is None else F.pad(x, (P - 1, 1))
        with self.accelerator.autocast():
            loss, stats = causal_lm_ppo_loss(
                model,
                torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                completion_targets(P, inputs["completion_ids"], mask),
                at_inputs(inputs.get("old_per_token_logps")),
                at_inputs(advantages),
                at_inputs(self._token_weights(mask, inputs, mode)),
                attention_mask=torch.cat([inputs["prompt_mask"], completion_mask], 1),
                ref_logp=at_inputs(inputs.get("ref_per_token_logps")) if self.beta != 0.0 else None,
                kl_coef=self.beta,
                clip_low=self.epsilon_low,
                clip_high=self.epsilon_high,
                temperature=self.temperature,
            )
        self._log_loss_stats(stats, mode)
        return loss

    def _log_loss_stats(self, stats, mode: str) -> None:
        """TRL's metric names, as means over the loss tokens of this micro-batch (averaged over processes)."""
        mean = lambda x: self.accelerator.gather(x.detach().reshape(1)).mean().item()
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(mean(stats.kl_ref))
        self._metrics[mode]["entropy"].append(mean(stats.entropy))
        self._metrics[mode]["clip_ratio/low_mean"].append(mean(stats.clip_frac_low))
        self._metrics[mode]["clip_ratio/high_mean"].append(mean(stats.clip_frac_high))
        self._metrics[mode]["clip_ratio/region_mean"].append(mean(stats.clip_frac_low + stats.clip_frac_high))
