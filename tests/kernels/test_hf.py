"""fastprime.kernels.hf against the model's own logits: `model(...).logits` in fp64 -> log_softmax -> gather."""

import copy

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fastprime.kernels.hf import causal_lm_logprobs, causal_lm_ppo_loss, completion_targets, head_logit_scale

V = 37  # odd vocabulary, not a multiple of any chunk


def tiny_qwen2(*, tied: bool, bias: bool = False, seed: int = 0) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # the default init (std 0.02) gives near-uniform logits; spread them
        for p in model.parameters():
            p.mul_(20.0) if p.dim() == 2 else None
        if bias:
            model.lm_head.bias = torch.nn.Parameter(torch.randn(V))
    return model


def padded_batch(seed: int = 1):
    """3 left-padded prompts of width 4 and completions of width 5 with right padding -> (ids, mask, targets)."""
    g = torch.Generator().manual_seed(seed)
    P, C = 4, 5
    prompt = torch.randint(0, V, (3, P), generator=g)
    prompt_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    completion = torch.randint(0, V, (3, C), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    ids = torch.cat([prompt, completion], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    return ids, mask, completion_targets(P, completion, completion_mask)


def reference_logprobs(model, ids, targets, *, temperature=1.0, **kwargs):
    """fp64 copy of the model -> logits / T -> log_softmax -> gather, plus the entropy; 0 at ignored targets."""
    m64 = copy.deepcopy(model).double()
    z = m64(input_ids=ids, use_cache=False, **kwargs).logits / temperature
    logp_all = z.log_softmax(-1)
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    scored = targets != -100
    return torch.where(scored, logp, 0.0), torch.where(scored, entropy, 0.0), m64


def assert_close(actual, expected, what, atol=2e-5):
    err = (actual.double() - expected.double()).abs()
    assert err.max() <= atol, f"{what}: max |error| {err.max():.3g} at flat index {err.argmax().item()}"


@pytest.mark.parametrize("tied,bias", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_padded_logprobs_and_entropy_equal_model_logits(tied, bias, temperature):
    model = tiny_qwen2(tied=tied, bias=bias)
    ids, mask, targets = padded_batch()
    out = causal_lm_logprobs(
        model, ids, targets, attention_mask=mask, temperature=temperature, return_entropy=True
    )
    ref_logp, ref_ent, _ = reference_logprobs(
        model, ids, targets, temperature=temperature, attention_mask=mask
    )
    assert ref_logp.abs().max() > 1.0  # the check is not on near-uniform distributions
    assert_close(out.logp, ref_logp, "logp")
    assert_close(out.entropy, ref_ent, "entropy")


@pytest.mark.parametrize("tied", [True, False])
def test_packed_logprobs_equal_each_sequence_alone(tied):
    """Three sequences packed in one row with restarting position_ids == each run through model(...) alone."""
    model = tiny_qwen2(tied=tied)
    g = torch.Generator().manual_seed(2)
    lengths, prompt_len = [5, 8, 6], 2
    seqs = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    targets = torch.cat([torch.cat([torch.full((prompt_len - 1,), -100), s[prompt_len:], torch.tensor([-100])]) for s in seqs])[None]  # fmt: skip
    logp = causal_lm_logprobs(model, ids, targets, position_ids=position_ids)
    ref = torch.cat([reference_logprobs(model, s[None], t[None])[0][0] for s, t in zip(seqs, targets[0].split(lengths))])  # fmt: skip
    assert_close(logp[0], ref, "packed logp")


def test_gradients_equal_model_logits_gradients():
    """d(sum_t c_t logp_t)/dθ through the body and the untied head with bias, against the fp64 model."""
    model = tiny_qwen2(tied=False, bias=True)
    ids, mask, targets = padded_batch()
    c = torch.randn(targets.shape, generator=torch.Generator().manual_seed(3))
    causal_lm_logprobs(model, ids, targets, attention_mask=mask, temperature=0.9).mul(c).sum().backward()
    ref_logp, _, m64 = reference_logprobs(model, ids, targets, temperature=0.9, attention_mask=mask)
    ref_logp.mul(c.double()).sum().backward()
    for (name, p), p64 in zip(model.named_parameters(), m64.parameters()):
        scale = p64.grad.abs().max().clamp(min=1e-3)
        assert_close(p.grad / scale, p64.grad / scale, f"grad {name} (relative to its max)", atol=1e-4)


def test_ppo_loss_equals_clipped_objective_on_model_logits():
    """The PPO loss with KL against the hand-written clipped objective on fp64 logits; value and gradients."""
    model = tiny_qwen2(tied=True)
    ids, mask, targets = padded_batch()
    g = torch.Generator().manual_seed(4)
    scored = targets != -100
    ref_logp0, _, _ = reference_logprobs(model, ids, targets, attention_mask=mask)
    old = (ref_logp0 + 0.3 * torch.randn(targets.shape, generator=g, dtype=torch.float64)).float()
    ref = (ref_logp0 + 0.2 * torch.randn(targets.shape, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(targets.shape, generator=g)
    w = scored.float() / scored.sum()
    loss, stats = causal_lm_ppo_loss(
        model, ids, targets, old, adv, w, attention_mask=mask, ref_logp=ref, kl_coef=0.1, clip_low=0.2,
        clip_high=0.28,
    )  # fmt: skip
    loss.backward()

    logp, _, m64 = reference_logprobs(model, ids, targets, attention_mask=mask)
    ratio = (logp - old.double()).exp()
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
    u = ref.double() - logp
    expected = (w * torch.where(scored, pg + 0.1 * (u.exp() - u - 1), 0.0)).sum()
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-5, f"loss {loss.item()} vs {expected.item()}"
    assert stats.clip_frac_low + stats.clip_frac_high > 0, "the test batch must exercise clipping"
    assert_close(stats.logp, logp, "stats.logp")
    for (name, p), p64 in zip(model.named_parameters(), m64.parameters()):
        scale = p64.grad.abs().max().clamp(min=1e-3)
        assert_close(p.grad / scale, p64.grad / scale, f"grad {name} (relative to its max)", atol=1e-4)


@pytest.mark.parametrize(
    "config_class,model_class,scale",
    [
        (GraniteConfig, GraniteForCausalLM, {"logits_scaling": 4.0}),
        (CohereConfig, CohereForCausalLM, {"logit_scale": 3.0}),
    ],
)
def test_architecture_logit_scale_folds_into_temperature(config_class, model_class, scale):
    """Granite divides its logits by logits_scaling, Cohere multiplies them by logit_scale."""
    config = config_class(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, **scale,
    )  # fmt: skip
    torch.manual_seed(0)
    model = model_class(config)
    assert head_logit_scale(model) == (0.25 if "logits_scaling" in scale else 3.0)
    with torch.no_grad():  # logits of order 10 after the architecture's scale
        model.lm_head.weight.mul_(50.0 / head_logit_scale(model))
    ids, mask, targets = padded_batch()
    logp = causal_lm_logprobs(model, ids, targets, attention_mask=mask, temperature=0.5)
    ref_logp, _, _ = reference_logprobs(model, ids, targets, temperature=0.5, attention_mask=mask)
    assert ref_logp.abs().max() > 1.0
    assert_close(logp, ref_logp, f"{model_class.__name__} logp")


def test_soft_capping_is_refused_by_name():
    model = tiny_qwen2(tied=True)
    model.config.final_logit_softcapping = 30.0
    ids, mask, targets = padded_batch()
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        causal_lm_logprobs(model, ids, targets, attention_mask=mask)


def test_bad_shapes_are_refused():
    model = tiny_qwen2(tied=True)
    ids, mask, targets = padded_batch()
    with pytest.raises(ValueError, match="targets shape"):
        causal_lm_logprobs(model, ids, targets[:, 1:], attention_mask=mask)
    with pytest.raises(ValueError, match="bias= is taken from the model"):
        causal_lm_ppo_loss(model, ids, targets, targets.float(), targets.float(), targets.float(), bias=None)


def test_on_policy_ppo_loss_without_old_logp():
    """old_logp=None: ratio exactly 1, gradient of Σ w (-A exp(logp - sg(logp)) + β k3) on the fp64 model."""
    model = tiny_qwen2(tied=False, bias=True)
    ids, mask, targets = padded_batch()
    scored = targets != -100
    adv = torch.randn(targets.shape, generator=torch.Generator().manual_seed(5))
    w = scored.float() / scored.sum()
    ref_logp0, _, _ = reference_logprobs(model, ids, targets, attention_mask=mask)
    ref = (ref_logp0 - 0.5).float()
    loss, stats = causal_lm_ppo_loss(
        model, ids, targets, None, adv, w, attention_mask=mask, ref_logp=ref, kl_coef=0.1
    )
    loss.backward()
    assert stats.ratio.item() == 1.0, f"on-policy mean ratio {stats.ratio.item()}"

    logp, _, m64 = reference_logprobs(model, ids, targets, attention_mask=mask)
    u = ref.double() - logp
    expected = (
        w * torch.where(scored, -adv * (logp - logp.detach()).exp() + 0.1 * (u.exp() - u - 1), 0.0)
    ).sum()
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-5, f"loss {loss.item()} vs {expected.item()}"
    for (name, p), p64 in zip(model.named_parameters(), m64.parameters()):
        scale = p64.grad.abs().max().clamp(min=1e-3)
        assert_close(p.grad / scale, p64.grad / scale, f"grad {name} (relative to its max)", atol=1e-4)
