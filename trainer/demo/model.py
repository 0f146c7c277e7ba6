"""The demo's policy: a tiny Qwen2 causal LM built from a config (no download), ~1M parameters."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

# Sizes from the feasibility probe (shared/docs/demo-notes.md): large enough to learn 2-4 step arithmetic
# in a few minutes of CPU training, small enough that an RL iteration of 32x4 samples takes about a second.
HIDDEN = 128
LAYERS = 4
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 512
MAX_POSITIONS = 256


def tiny_qwen2_config(tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    """The demo model's config: 4 layers, hidden 128, 4 query / 2 KV heads, tied embeddings."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation="sdpa",
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, *, seed: int) -> Qwen2ForCausalLM:
    """A freshly initialised fp32 Qwen2ForCausalLM (~1M parameters) over `tokenizer`'s vocabulary.

    The weights depend only on `seed` (the global RNG is restored afterwards). The generation config stops
    at the tokenizer's EOS and pads with its pad token, so `generate` needs no extra arguments for that.
    """
    config = tiny_qwen2_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model
