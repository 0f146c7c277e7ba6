"""Collecting one iteration's groups (rollout.collect_batch): every trained response is sampled in that
iteration (the refill buffer carries prompts, not responses), and no round samples a prompt twice.

The real hf engine on the tiny demo model with a zero final norm (every token, EOS included, has probability
1/31) and `filter.drop_truncated`: a group passes only if all its responses end within the length limit, which
happens about half the time, so rounds pass some groups and not others and the buffer is used."""

import pytest
import torch

from fastprime.trainer.config import Config
from fastprime.trainer.data import PromptStream, build_prompts
from fastprime.trainer.demo import build_tiny_model, build_tokenizer, make_arithmetic_rows
from fastprime.trainer.filtering import RefillBuffer
from fastprime.trainer.metrics import Timer
from fastprime.trainer.rollout import HFRolloutEngine, collect_batch, generation_seed, rollout_round
from fastprime.trainer.verifiers import VerifierPool


@pytest.fixture(scope="module")
def parts():
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0)
    with torch.no_grad():
        lm.model.norm.weight.zero_()
    # 37 tokens: P(a response ends in time) = 1 - (30/31)^37 ~ 0.7, both of a group's two ~ 0.5
    engine = HFRolloutEngine(
        lm, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, max_new_tokens=37
    )
    prompts, _ = build_prompts(make_arithmetic_rows(10, seed=0), tok, source="demo", max_prompt_tokens=64)
    with VerifierPool(workers=1, timeout_s=5.0) as pool:
        yield tok, engine, prompts, pool


def _config(batch_size: int) -> Config:
    cfg = Config()
    cfg.train.batch_size, cfg.rollout.n_samples = batch_size, 2
    cfg.filter.lo, cfg.filter.hi, cfg.filter.drop_truncated, cfg.filter.max_rounds = 0.0, 1.0, True, 3
    return cfg


def test_every_trained_group_was_sampled_in_its_iteration(parts, group_of_one):
    tok, engine, prompts, pool = parts
    cfg, d = _config(batch_size=3), group_of_one
    stream, buffer = PromptStream(len(prompts), seed=0), RefillBuffer()
    from_buffer = passed_again = 0
    for step in range(1, 9):
        groups, stats = collect_batch(
            engine, pool, prompts, stream, buffer, cfg, step, d, Timer(d.device), tok
        )
        this_step = {
            generation_seed(cfg.train.seed, step, r, d.rank) for r in range(1, stats["filter/rounds"] + 1)
        }
        assert all(g.seed in this_step for g in groups), (
            f"step {step}: a group sampled in an earlier iteration"
        )
        from_buffer += stats["filter/from_buffer"]
        passed_again += stats["filter/from_buffer_passed"]
        assert 0 <= stats["filter/from_buffer_passed"] <= stats["filter/from_buffer"]
    assert from_buffer > 0, "the refill buffer was never used: the test does not exercise it"
    assert passed_again < from_buffer, "resampled buffer prompts should sometimes fail the filter again"


def test_a_round_samples_what_the_pass_rate_says(parts, group_of_one):
    """The first round samples (B + sqrt(B (1 - p))) / p prompts at the last pass rate p (capped at B *
    max_rounds); every group passes here (drop_truncated off), so the surplus waits in the buffer, and the next
    iteration, at pass rate 1, samples only the B buffered prompts."""
    tok, engine, prompts, pool = parts
    cfg, d = _config(batch_size=3), group_of_one
    cfg.filter.drop_truncated = False
    stream, buffer = PromptStream(len(prompts), seed=0), RefillBuffer()

    def collect(step, pass_rate, buffer=buffer):
        return collect_batch(
            engine, pool, prompts, stream, buffer, cfg, step, d, Timer(d.device), tok, pass_rate=pass_rate
        )

    groups, stats = collect(1, 0.5)
    # (3 + sqrt(1.5)) / 0.5 = 8.45 -> 9 prompts, 2 responses each, one round
    assert (stats["rollout/responses"], stats["filter/rounds"], len(groups), len(buffer)) == (18, 1, 3, 6)
    groups, stats = collect(2, stats["filter/pass_rate"])
    assert (stats["rollout/responses"], stats["filter/from_buffer"], len(buffer)) == (6, 3, 3)
    cfg.filter.enabled = False  # no filter: the pass rate means nothing, B prompts
    _, stats = collect(3, 0.5, buffer=RefillBuffer())
    assert stats["rollout/responses"] == 6


def test_a_repeated_prompt_gets_two_groups(parts, group_of_one):
    """Groups are keyed by position: a prompt listed twice is sampled twice, neither dropped nor duplicated."""
    tok, engine, prompts, pool = parts
    groups, _ = rollout_round(
        engine,
        pool,
        prompts,
        [3, 5, 3],
        k=2,
        seed=11,
        d=group_of_one,
        timer=Timer(group_of_one.device),
        tok=tok,
    )
    assert [g.prompt for g in groups] == [3, 5, 3]
    assert groups[0].responses != groups[2].responses and groups[0] is not groups[2]


def test_stream_never_repeats_a_prompt_in_one_take_across_epochs():
    """10 prompts in takes of 4 cross an epoch boundary every few takes; each epoch still visits each prompt once."""
    s = PromptStream(10, seed=0)
    takes = [s.take(4) for _ in range(10)]  # 40 = 4 epochs
    for t in takes:
        assert len(set(t)) == 4, t
    flat = [i for t in takes for i in t]
    for e in range(4):
        assert sorted(flat[10 * e : 10 * e + 10]) == list(range(10)), (
            f"epoch {e}: {flat[10 * e : 10 * e + 10]}"
        )
    # resume mid-way replays the same takes, deferred indices included
    s2, s3 = PromptStream(10, seed=0), PromptStream(10, seed=0)
    for _ in range(3):
        s2.take(4)
    s3.load_state_dict(s2.state_dict())
    assert [s3.take(4) for _ in range(7)] == takes[3:]


def test_stream_passes_over_excluded_prompts():
    s = PromptStream(10, seed=1)
    t = s.take(6, exclude=[2, 7])
    assert len(set(t)) == 6 and not {2, 7} & set(t)
    with pytest.raises(ValueError, match="distinct"):
        s.take(9, exclude=[1, 2])
