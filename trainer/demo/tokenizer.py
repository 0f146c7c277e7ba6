"""The demo's tokenizer: one token per character, built offline, with a chat template.

Character-level keeps the vocabulary at ~30 entries (the task's characters plus a few special tokens), so
the tiny model spends its parameters on arithmetic, not on an embedding table, and nothing is downloaded.
"""

from __future__ import annotations

from fastprime.trainer.demo.task import TASK_CHARS
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<|pad|>", "<|eos|>", "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, EOS, UNK, *ROLE_TOKENS)

# Each message is its role token then its content; an assistant turn ends with EOS, which is what the model
# learns to emit and what generation stops on. The generation prompt is the bare assistant role token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level `PreTrainedTokenizerFast` over the demo task's characters.

    Special tokens: `<|pad|>` (id 0), `<|eos|>`, `<|unk|>` (any character outside the task's alphabet) and
    the role tokens `<|system|>`, `<|user|>`, `<|assistant|>` used by the chat template. Padding is on the
    left so that batched `generate` continues every prompt from its last real token.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in TASK_CHARS:
        vocab.setdefault(ch, len(vocab))
    # BPE with no merges and no pre-tokenizer is exactly "one token per character, unknown -> <|unk|>";
    # Fuse joins the pieces back without the spaces a default decoder would insert.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=512,
    )
