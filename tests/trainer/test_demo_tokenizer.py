"""The demo's character tokenizer: one token per character, exact round trip, chat template, padding."""

from transformers import AutoTokenizer

from fastprime.trainer.demo import build_tiny_model, build_tokenizer, make_arithmetic_rows

TOK = build_tokenizer()


def test_round_trip_one_token_per_character():
    for row in make_arithmetic_rows(20, seed=0):
        for text in (row["prompt"][0]["content"], row["extra_info"]["solution"]):
            ids = TOK(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text)
            assert TOK.decode(ids) == text
    text = "12\n\\boxed{3}"
    assert [TOK.decode([i]) for i in TOK(text, add_special_tokens=False)["input_ids"]] == list(text)


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


def test_an_exported_model_folder_reloads_the_same_tokenizer(tmp_path):
    """AutoTokenizer picks Qwen2Tokenizer for a qwen2 folder; it must give the same ids and template."""
    build_tiny_model(TOK, seed=0).save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    row = make_arithmetic_rows(1, seed=0)[0]
    prompt = loaded.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert prompt == TOK.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    text = prompt + row["extra_info"]["solution"] + TOK.eos_token
    ids = TOK(text, add_special_tokens=False)["input_ids"]
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(ids) == text
    assert (loaded.eos_token_id, loaded.pad_token_id) == (TOK.eos_token_id, TOK.pad_token_id)
