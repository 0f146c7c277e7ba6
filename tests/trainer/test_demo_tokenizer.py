"""The demo's character tokenizer: one token per character, exact round trip, chat template, padding."""

from fastprime.trainer.demo import build_tokenizer, make_arithmetic_rows

TOK = build_tokenizer()


def test_round_trip_one_token_per_character():
    for row in make_arithmetic_rows(20, seed=0):
        for text in (row["prompt"][0]["content"], row["extra_info"]["solution"]):
            ids = TOK(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text)
            assert TOK.decode(ids) == text
    assert TOK.convert_ids_to_tokens(TOK("12\n\\boxed{3}", add_special_tokens=False)["input_ids"]) == list(
        "12\n\\boxed{3}"
    )


def test_special_tokens_and_unknown_characters():
    assert TOK.pad_token == "<|pad|>" and TOK.eos_token == "<|eos|>"
    assert len({TOK.pad_token_id, TOK.eos_token_id, TOK.unk_token_id}) == 3
    assert TOK("1a", add_special_tokens=False)["input_ids"] == [
        TOK.convert_tokens_to_ids("1"),
        TOK.unk_token_id,
    ]
    assert TOK.decode([TOK.convert_tokens_to_ids("7"), TOK.eos_token_id], skip_special_tokens=True) == "7"
    assert len(TOK) < 40


def test_chat_template():
    prompt = [{"role": "user", "content": "3+4*2"}]
    assert (
        TOK.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        == "<|user|>3+4*2<|assistant|>"
    )
    convo = prompt + [{"role": "assistant", "content": "\\boxed{14}"}]
    text = TOK.apply_chat_template(convo, tokenize=False)
    assert text == "<|user|>3+4*2<|assistant|>\\boxed{14}<|eos|>"
    ids = TOK(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == TOK.convert_tokens_to_ids("<|user|>") and ids[-1] == TOK.eos_token_id
    assert len(ids) == 2 + len("3+4*2") + len("\\boxed{14}") + 1


def test_batches_pad_on_the_left():
    enc = TOK(["1+2", "10+20"], padding=True, add_special_tokens=False)
    assert enc["input_ids"][0][:2] == [TOK.pad_token_id] * 2
    assert enc["attention_mask"][0] == [0, 0, 1, 1, 1]
