"""Prompt loading: PRIME/verl parquet and JSONL rows, chat template, malformed rows, seeded stream."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastprime.trainer.data import PromptStream, load_prompts
from fastprime.trainer.demo import build_tokenizer

VERL_ROW = {
    "data_source": "numina_olympiads",
    "prompt": [{"role": "user", "content": "1+2="}],
    "ability": "math",
    "reward_model": {"style": "rule", "ground_truth": "3"},
    "extra_info": {"index": 0},
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_verl_parquet_rows(tmp_path, tok):
    path = tmp_path / "train.parquet"
    rows = [
        VERL_ROW,
        {
            **VERL_ROW,
            "prompt": [{"role": "system", "content": "x"}, {"role": "user", "content": "4-1="}],
            "reward_model": {"style": "rule", "ground_truth": "3"},
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    prompts, stats = load_prompts(path, tok, max_prompt_tokens=100)
    assert stats.rows == 2 and len(prompts) == 2
    expected = tok("<|user|>1+2=<|assistant|>", add_special_tokens=False)["input_ids"]
    assert prompts[0].prompt_ids == expected
    assert (prompts[0].ground_truth, prompts[0].ability, prompts[0].data_source) == (
        "3",
        "math",
        "numina_olympiads",
    )
    assert (
        prompts[1].prompt_ids
        == tok("<|system|>x<|user|>4-1=<|assistant|>", add_special_tokens=False)["input_ids"]
    )


def test_plain_jsonl_rows_and_length_limit(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"prompt": "2*3=", "ground_truth": "6"})
        + "\n\n"
        + json.dumps({"prompt": "1" * 50, "ground_truth": "1"})
        + "\n"
    )
    prompts, stats = load_prompts(path, tok, max_prompt_tokens=20)
    assert len(prompts) == 1 and stats.too_long == 1 and prompts[0].ability == "math"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "row 1 (line 2) is not valid JSON"),
        (json.dumps({"question": "x"}), "row 1: missing 'prompt'"),
        (json.dumps({"prompt": "x"}), "row 1: missing the answer"),
        (json.dumps({"prompt": [{"role": "user"}], "ground_truth": "1"}), "row 1: prompt message 0"),
        (json.dumps({**VERL_ROW, "ability": "chess"}), "row 1: ability='chess'"),
    ],
)
def test_malformed_row_names_file_and_row(tmp_path, tok, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(VERL_ROW) + "\n" + line + "\n" + json.dumps(VERL_ROW) + "\n")
    with pytest.raises(ValueError) as e:
        load_prompts(path, tok, max_prompt_tokens=100)
    assert str(path) in str(e.value) and message in str(e.value)
    prompts, stats = load_prompts(path, tok, max_prompt_tokens=100, bad_rows="skip")
    assert len(prompts) == 2 and stats.bad_rows == 1 and message in stats.first_errors[0]


def test_all_rows_bad_is_an_error(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text("[1]\n")
    with pytest.raises(ValueError, match="no usable prompts among 1 rows"):
        load_prompts(path, tok, max_prompt_tokens=100, bad_rows="skip")


def test_prompt_stream_epochs_and_resume():
    s = PromptStream(5, seed=3)
    first = s.take(4)
    state = s.state_dict()
    rest = s.take(4) + s.take(4)  # one take never repeats a prompt, so at most 5 at a time
    assert sorted(first + rest[:1]) == list(range(5)), "an epoch visits every prompt once"
    assert sorted(rest[1:6]) == list(range(5))
    t = PromptStream(5, seed=3)
    t.load_state_dict(state)
    assert t.take(4) + t.take(4) == rest
    u = PromptStream(5, seed=3, shuffle=False)
    assert u.take(4) + u.take(3) == [0, 1, 2, 3, 4, 0, 1]
