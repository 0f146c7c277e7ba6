"""The hf rollout engine: K samples per prompt, stop at EOS, truncation flag, seeded, weight sync."""

import pytest
import torch

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
