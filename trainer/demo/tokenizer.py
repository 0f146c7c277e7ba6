"""The demo's tokenizer: one token per character, built offline, with a chat template.

Character-level keeps the vocabulary at ~30 entries (the task's characters plus a few special tokens), so
the tiny model spends its parameters on arithmetic, not on an embedding table, and nothing is downloaded.

The vocabulary is written in GPT-2's byte-level alphabet (a newline is stored as "Ċ") with a byte-level
pre-tokenizer and decoder. That is what `AutoTokenizer.from_pretrained` rebuilds for a folder whose
config.json says qwen2 (it loads `Qwen2Tokenizer`, which installs byte-level pieces over the saved vocab),
so an exported demo policy reloads with the same token ids; a plain character vocabulary would lose "\n".
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fastprime.trainer.demo.task import TASK_CHARS

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


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable bytes map to themselves, others above 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level `PreTrainedTokenizerFast` over the demo task's characters.

    Special tokens: `<|pad|>` (id 0), `<|eos|>`, `<|unk|>` (any character outside the task's alphabet) and
    the role tokens `<|system|>`, `<|user|>`, `<|assistant|>` used by the chat template. Padding is on the
    left so that batched `generate` continues every prompt from its last real token.
    """
    alphabet = byte_level_alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in TASK_CHARS:
        vocab.setdefault(alphabet[ord(ch)], len(vocab))
    # BPE with no merges is exactly "one token per (byte-level) character, unknown -> <|unk|>".
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
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
