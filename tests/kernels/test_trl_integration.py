"""FusedGRPOTrainer against trl.GRPOTrainer itself: same seed, batch and model -> same loss and updated weights."""

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from fastprime.kernels.integrations.trl import FusedGRPOTrainer  # noqa: E402
from fastprime.trainer.demo.model import build_tiny_model  # noqa: E402
from fastprime.trainer.demo.tokenizer import build_tokenizer  # noqa: E402


def digit_reward(completions, **kwargs):
    """Deterministic and varied within a group: the number of digits in the completion."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The demo's tiny Qwen2 (tied embeddings) and tokenizer saved to a local folder, as a user's model would be."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tokenizer = build_tokenizer()
    build_tiny_model(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Recording:
    """Keeps each micro-batch's loss and completions (the trainers' own methods run unchanged)."""

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)
        self.seen_completions = [*getattr(self, "seen_completions", []), inputs["completion_ids"].clone()]
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses = [*getattr(self, "losses", []), loss.detach().clone()]
        return loss


class RecordingTRL(Recording, GRPOTrainer):
    pass


class RecordingFused(Recording, FusedGRPOTrainer):
    pass


def train(trainer_class, model_dir, tmp_path, **options):
    config = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        max_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, beta=0.05, use_bias_correction_kl=False, temperature=0.8, epsilon_high=0.28,
        report_to="none", use_cpu=True, bf16=False, seed=7, save_strategy="no", logging_steps=1,
    )  # fmt: skip
    config.update(options)
    trainer = trainer_class(
        model=str(model_dir),
        reward_funcs=digit_reward,
        args=GRPOConfig(**config),
        train_dataset=Dataset.from_dict(
            {"prompt": ["<|user|>12+7=<|assistant|>", "<|user|>3*(4-1)=<|assistant|>"]}
        ),
        processing_class=build_tokenizer(),
    )
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    delta = {k: v.detach() - before[k] for k, v in trainer.model.named_parameters()}
    return trainer, delta


CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo"),
    # two micro-batches of 2 per optimizer step: the normalisers span the accumulation window
    "dapo-accumulation": dict(loss_type="dapo", per_device_train_batch_size=2, gradient_accumulation_steps=2),
    "grpo-accumulation": dict(loss_type="grpo", per_device_train_batch_size=2, gradient_accumulation_steps=2),
    # two updates on one generation: old log-probs from before the first update, ratios != 1, clipping active
    "dapo-off-policy": dict(loss_type="dapo", num_iterations=2, epsilon=0.02),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_one_step_equals_trl(case, model_dir, tmp_path):
    trl_trainer, trl_delta = train(RecordingTRL, model_dir, tmp_path / "trl", **CASES[case])
    fused_trainer, fused_delta = train(RecordingFused, model_dir, tmp_path / "fused", **CASES[case])

    for a, b in zip(trl_trainer.seen_completions, fused_trainer.seen_completions, strict=True):
        assert torch.equal(a, b), (
            "same completions: the first from the same seed, later ones after equal updates"
        )
    trl_losses, fused_losses = torch.stack(trl_trainer.losses), torch.stack(fused_trainer.losses)
    assert trl_losses.abs().max() > 1e-3, f"a vacuous loss {trl_losses}"
    assert torch.allclose(fused_losses, trl_losses, rtol=1e-5, atol=1e-6), (
        f"loss {fused_losses} vs {trl_losses}"
    )
    if case == "dapo-off-policy":
        clipped = [log["clip_ratio/region_mean"] for log in trl_trainer.state.log_history if "loss" in log]
        assert max(clipped) > 0, f"the off-policy case must clip some tokens, TRL logged {clipped}"
    largest = max(d.abs().max() for d in trl_delta.values())
    assert largest > 1e-3, f"the step must move the weights, max |Δ| {largest}"
    for name, d in trl_delta.items():
        err = (fused_delta[name] - d).abs().max()
        assert err <= 1e-4 * largest, f"Δ{name}: max |fused - trl| {err:.3g} (largest |Δ| {largest:.3g})"


@pytest.mark.parametrize(
    "option,message",
    [
        (dict(loss_type="cispo"), "loss_type='cispo'"),
        (dict(use_bias_correction_kl=True), "use_bias_correction_kl=True"),
        (dict(entropy_coef=0.01), "entropy_coef=0.01"),
        (dict(top_entropy_quantile=0.2), "top_entropy_quantile=0.2"),
        (dict(delta=2.0), "delta=2.0"),
        (
            dict(importance_sampling_level="sequence", loss_type="grpo"),
            "importance_sampling_level='sequence'",
        ),
    ],
)
def test_unsupported_options_are_refused_by_name(option, message, model_dir, tmp_path):
    with pytest.raises(ValueError, match=f"FusedGRPOTrainer cannot honour: .*{message}"):
        train(FusedGRPOTrainer, model_dir, tmp_path, **option)
