"""The demo's tiny Qwen2 model: size, architecture, seeding."""

import torch

from fastprime.trainer.demo import build_tiny_model, build_tokenizer

TOK = build_tokenizer()


def test_tiny_qwen2_shape_and_size():
    model = build_tiny_model(TOK, seed=0)
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        4,
        128,
        4,
        2,
    )
    assert cfg.vocab_size == len(TOK)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    n = sum(p.numel() for p in model.parameters())
    assert 0.8e6 <= n <= 1.2e6, n
    ids = torch.tensor([[TOK.convert_tokens_to_ids("<|user|>"), 5, 6, 7]])
    hidden = model.model(input_ids=ids).last_hidden_state
    assert hidden.shape == (1, 4, 128) and hidden.dtype == torch.float32


def test_seed_decides_the_weights_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(TOK, seed=0)
    assert torch.equal(torch.rand(3), expected_next)
    b = build_tiny_model(TOK, seed=0)
    c = build_tiny_model(TOK, seed=1)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert model_gen_ids(a) == (TOK.eos_token_id, TOK.pad_token_id)


def model_gen_ids(model):
    return model.generation_config.eos_token_id, model.generation_config.pad_token_id
