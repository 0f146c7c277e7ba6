"""The hf rollout engine: K samples per prompt, stop at EOS, truncation flag, seeded, weight sync."""

import pytest
import torch

from fastprime.trainer.decode import decode, greedy_token
from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.rollout import HFRolloutEngine


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    return tok, build_tiny_model(tok, seed=0)


def _engine(tok, lm, **kw):
    return HFRolloutEngine(
        lm, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, max_new_tokens=8, **kw
    )


def test_samples_grouped_stop_at_eos_and_are_seeded(setup):
    tok, lm = setup
    # A zero final norm makes every logit 0: each token, EOS included, has probability 1/V, so responses
    # both stop at EOS and run into the 8-token limit.
    lm = build_tiny_model(tok, seed=0)
    with torch.no_grad():
        lm.model.norm.weight.zero_()
    eng = _engine(tok, lm, temperature=1.0)
    prompts = [tok("<|user|>1+2=<|assistant|>")["input_ids"], tok("<|user|>3=<|assistant|>")["input_ids"]]
    out = eng.generate(prompts, n=3, seed=5)
    assert len(out) == 6
    assert {r.truncated for r in out} == {True, False}, "the seed should give both outcomes"
    for r in out:
        assert 1 <= len(r.response_ids) <= 8
        assert tok.pad_token_id not in r.response_ids
        if r.truncated:
            assert len(r.response_ids) == 8 and tok.eos_token_id not in r.response_ids
        else:
            assert r.response_ids[-1] == tok.eos_token_id and tok.eos_token_id not in r.response_ids[:-1]
    again = eng.generate(prompts, n=3, seed=5)
    assert [r.response_ids for r in again] == [r.response_ids for r in out]
    other = eng.generate(prompts, n=3, seed=6)
    assert [r.response_ids for r in other] != [r.response_ids for r in out]


def test_weight_sync_changes_generation_and_rejects_wrong_keys(setup):
    tok, lm = setup
    eng = _engine(tok, lm, temperature=1e-4)  # near greedy
    prompts = [tok("<|user|>7-2=<|assistant|>")["input_ids"]]
    before = eng.generate(prompts, n=1, seed=0)[0].response_ids
    new = build_tiny_model(tok, seed=1).state_dict()
    new.pop("lm_head.weight")  # tied: a sharded state dict stores it once
    eng.sync_weights(new)
    assert torch.equal(eng.model.lm_head.weight, new["model.embed_tokens.weight"])
    assert eng.generate(prompts, n=1, seed=0)[0].response_ids != before
    with pytest.raises(ValueError, match="missing"):
        eng.sync_weights({k: v for k, v in new.items() if "layers.0." not in k})


def test_checkpoint_generation_config_does_not_change_sampling(setup, caplog):
    """A checkpoint whose generation_config sets penalties and top_k samples exactly like one without it."""
    import copy
    import logging

    tok, lm = setup
    plain = _engine(tok, lm, temperature=1.0)
    tuned = copy.deepcopy(lm)
    gc = tuned.generation_config
    gc.do_sample, gc.repetition_penalty, gc.top_k, gc.no_repeat_ngram_size, gc.temperature = (
        True,
        1.8,
        3,
        2,
        0.3,
    )
    with caplog.at_level(logging.WARNING, logger="fastprime.trainer.rollout"):
        other = _engine(tok, tuned, temperature=1.0)
    prompts = [tok("<|user|>1+2=<|assistant|>")["input_ids"], tok("<|user|>9-4=<|assistant|>")["input_ids"]]
    want = [r.response_ids for r in plain.generate(prompts, n=4, seed=3)]
    assert [r.response_ids for r in other.generate(prompts, n=4, seed=3)] == want
    assert other.model.generation_config.repetition_penalty == 1.8, "the model's own config is kept (export)"
    assert "repetition_penalty" in caplog.text and "top_k" in caplog.text, caplog.text


def _greedy_by_full_forward(lm, prompt: list[int], eos: set[int], steps: int) -> list[int]:
    """The reference: one prompt alone, no padding and no cache, argmax of a full forward at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            t = int(lm(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(t)
            if t in eos:
                break
    return ids[len(prompt) :]


def test_decode_loop_equals_full_forwards_while_rows_finish_at_different_steps(setup):
    """Near-greedy sampling of prompts of different lengths (left padding), with EOS ids chosen so that rows end
    at different steps: the loop drops them from its batch and cache as they end, and every response must still
    be the one that full forwards of each prompt alone give."""
    tok, _ = setup
    lm = build_tiny_model(tok, seed=0)
    # larger weights: the untrained model's greedy text would otherwise be one token repeated
    with torch.no_grad():
        for w in lm.parameters():
            if w.dim() == 2:
                w.mul_(10)
    prompts = [
        tok(f"<|user|>{q}=<|assistant|>")["input_ids"] for q in ("1+2", "37*4-5", "9", "(8-3)*2", "6/3+11*7")
    ]
    free = [_greedy_by_full_forward(lm, p, set(), 10) for p in prompts]
    # an EOS set that ends response 0 at step 2 and response 3 at step 5, unless they end earlier on another
    eos = sorted({free[0][2], free[3][5]})
    want = [_greedy_by_full_forward(lm, p, set(eos), 10) for p in prompts]
    lengths = sorted({len(w) for w in want})
    assert len(lengths) >= 3 and lengths[-1] == 10, f"the rows should end at different steps: {want}"
    eng = HFRolloutEngine(
        lm, eos_token_ids=eos, pad_token_id=tok.pad_token_id, max_new_tokens=10, temperature=1e-4
    )
    out = eng.generate(prompts, n=2, seed=0)
    assert [r.response_ids for r in out] == [w for w in want for _ in range(2)]
    assert [r.truncated for r in out] == [w[-1] not in eos for w in want for _ in range(2)]
    # evaluation's greedy decoding is the same loop with argmax
    greedy = decode(
        lm,
        prompts,
        n=1,
        max_new_tokens=10,
        eos_token_ids=eos,
        pad_token_id=tok.pad_token_id,
        pick=greedy_token,
    )
    assert [r.response_ids for r in greedy] == want


@pytest.mark.parametrize(
    ("temperature", "top_p", "expected"),
    [
        (1.0, 1.0, [0.5, 0.3, 0.2]),
        (1.0, 0.7, [0.625, 0.375, 0.0]),  # 0.2 alone sums to <= 0.3 = 1 - top_p: outside the nucleus
        (1.0, 0.4, [1.0, 0.0, 0.0]),  # 0.2 + 0.3 <= 0.6: only the most probable token stays
        (2.0, 1.0, [0.5**0.5, 0.3**0.5, 0.2**0.5]),  # p^(1/T), normalised below
    ],
)
def test_sample_token_follows_temperature_and_nucleus(temperature, top_p, expected):
    from fastprime.trainer.decode import sample_token

    expected = torch.tensor(expected, dtype=torch.float64)
    expected /= expected.sum()
    n = 40_000
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(n, 3)
    torch.manual_seed(0)
    counts = torch.bincount(sample_token(logits, temperature=temperature, top_p=top_p), minlength=3)
    freq = counts.double() / n
    assert torch.all(freq[expected == 0] == 0), freq
    # 5 standard deviations of a binomial frequency
    assert torch.allclose(freq, expected, atol=5 * (0.25 / n) ** 0.5), (freq, expected)
