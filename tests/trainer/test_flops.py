"""Model FLOPs (trainer/flops.py) against hand arithmetic and against torch's FlopCounterMode over real forwards
of the demo Qwen2, and the perf/ metrics of a real CPU run.

FlopCounterMode counts every matmul the run executes (2 FLOPs per multiply-add), so it sees what the model
count leaves out by definition: attention entries that are computed and then masked. Under SDPA's math backend
(the CPU fused kernel is not in the counter's table) each causal SDPA call over L tokens is two bmm's over the
full L x L scores, 4 * H*hd * L^2 FLOPs per layer, where the model count takes the causal L(L+1)/2 keys. The
difference, 4 * n_layers * H*hd * L(L-1)/2 per call, is the whole difference: the linear layers (mm/addmm)
must agree exactly, so the tolerance is zero (integer counts, no rounding anywhere).
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, Qwen2Config, Qwen2MoeConfig

from fastprime.trainer import attention as packed_attention
from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.flops import bf16_peak, forward_flops, packed_flops, sequence_flops
from fastprime.trainer.metrics import model_flops_rates, read_metrics
from fastprime.trainer.models import HeadlessLM
from fastprime.trainer.packing import pack
from fastprime.trainer.passes import Dist, micro_batches, own_flops
from fastprime.trainer.rollout import HFRolloutEngine


def _tiny_config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip


def test_sequence_flops_by_hand():
    # D = 8, H = 2 query heads, Hkv = 1, hd = D / H = 4, I = 16, V = 10, 3 layers.
    # per layer: q 8*8 = 64, k 8*4 = 32, v 8*4 = 32, o 8*8 = 64 -> 192; MLP 3 * 8*16 = 384 -> 576 weights
    # 3 layers: 1728 weights; lm_head 10*8 = 80
    # sequences: prompt 2 + response 3 -> 4 inputs; prompt 3 + response 1 -> 3 inputs: 7 tokens, 4 head rows
    # body 2 * 1728 * 7 = 24192; head 2 * 80 * 4 = 640
    # attention 4 * layers * H*hd * (4*5/2 + 3*4/2) = 4 * 3 * 8 * 16 = 1536
    assert sequence_flops(_tiny_config(), [2, 3], [3, 1]) == 24192 + 640 + 1536
    # the same tokens as one forward with the head on every token: 7 head rows, 2 * 80 * 7 = 1120
    assert forward_flops(_tiny_config(), [4, 3]) == 24192 + 1120 + 1536


def test_explicit_head_dim_and_bad_configs():
    # head_dim 6 != D / H: q, o 8*12 = 96 each, k, v 8*6 = 48 each -> 288 + MLP 384 = 672 per layer, 2016 in all
    cfg = _tiny_config()
    cfg.head_dim = 6
    assert forward_flops(cfg, [1]) == 2 * 2016 + 2 * 80 + 4 * 3 * 12 * 1
    with pytest.raises(ValueError, match="intermediate_size"):  # GPT-2: no gated MLP, not this count's shape
        forward_flops(GPT2Config(), [1])
    with pytest.raises(ValueError, match="mixture of experts"):
        forward_flops(Qwen2MoeConfig(), [1])


def _counted(fn) -> tuple[int, int]:
    """(linear-layer FLOPs: mm + addmm, attention FLOPs: bmm) of fn() as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        fn()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(counts) <= {"aten.mm", "aten.addmm", "aten.bmm"}, counts
    return counts.get("aten.mm", 0) + counts.get("aten.addmm", 0), counts["aten.bmm"]


def _masked(lm, lengths: list[int]) -> int:
    """FLOPs of the attention entries above the causal diagonal: 4 * layers * H*hd * L(L-1)/2 per SDPA call."""
    c = lm.config
    return (
        4
        * c.num_hidden_layers
        * c.num_attention_heads
        * (c.hidden_size // c.num_attention_heads)
        * sum(L * (L - 1) // 2 for L in lengths)
    )


def test_packed_forward_matches_flop_counter():
    """The trainer's packed forward (HeadlessLM, packed attention backend, head on the response rows)."""
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0)
    lm.config._attn_implementation = packed_attention.register()
    prompts, responses = [[3, 4, 5], [6, 7], [8, 9, 10, 11]], [[12, 13, 14, 15], [16, 17, 18], [19]]
    mb = pack(prompts, responses, [0, 1, 2])
    linear, attention = _counted(
        lambda: HeadlessLM(lm)(mb.input_ids, mb.position_ids, lambda h, w, b: h @ w.T, mb.pos)
    )
    lengths = [6, 4, 4]  # P + R - 1 each
    model = sequence_flops(lm.config, [3, 2, 4], [4, 3, 1])
    assert linear + attention == model + _masked(lm, lengths)
    assert attention == 4 * 4 * 128 * sum(L * L for L in lengths)  # 4 layers, H*hd = 128: the full squares


def test_shared_prompt_forward_matches_flop_counter():
    """Three responses to one 3-token prompt and a lone sequence: the prompt's tokens run once (packing.py)."""
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0)
    lm.config._attn_implementation = packed_attention.register()
    prompts = [[3, 4, 5]] * 3 + [[6, 7]]
    responses = [[12, 13, 14, 15], [16, 17, 18], [19, 20], [21, 22]]
    mb = pack(prompts, responses, [0, 1, 2, 3])
    assert mb.num_tokens == (3 + 3 + 2 + 1) + (2 + 1)  # not 6 + 5 + 4 + 3: the prompt is packed once
    linear, attention = _counted(
        lambda: HeadlessLM(lm)(mb.input_ids, mb.position_ids, lambda h, w, b: h @ w.T, mb.pos)
    )
    # segments (tokens, prefix): prompt + first response (6, 0), then (2, 3) and (1, 3), the lone one (3, 0)
    model = packed_flops(lm.config, [(6, 0), (2, 3), (1, 3), (3, 0)], head_tokens=4 + 3 + 2 + 2)
    # the counter sees every entry of each SDPA call's scores: the 9-token group in one call (a 9 x 9 mask),
    # the lone sequence 3 x 3; the model count takes the keys each query attends to: 6*7/2 + 2*3 + 2*3/2 + 1*3 + 1
    # + 3*4/2 = 40
    width = 4 * 4 * 128  # 4 layers, H*hd = 128
    assert attention == width * (9 * 9 + 3 * 3)
    assert linear + attention == model + width * (9 * 9 + 3 * 3 - 40)


def test_padded_hf_forward_matches_flop_counter():
    """transformers' own forward over a [B, L] batch: the head on every token, one L x L square per row."""
    lm = build_tiny_model(build_tokenizer(), seed=0)
    ids = torch.randint(2, lm.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))
    linear, attention = _counted(lambda: lm(input_ids=ids))
    assert linear + attention == forward_flops(lm.config, [5, 5, 5]) + _masked(lm, [5, 5, 5])


def test_generation_matches_flop_counter():
    """The rollout engine's KV-cache generation costs one forward over the sequence (flops.sequence_flops): the
    counter differs only by the prefill's masked triangle; each decode step attends to exactly its context."""
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0)
    engine = HFRolloutEngine(
        lm, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, max_new_tokens=9
    )
    prompt = tok("12+34=")["input_ids"]
    out = []
    linear, attention = _counted(lambda: out.extend(engine.generate([prompt], n=1, seed=0)))
    R = len(out[0].response_ids)
    assert R > 1, "the test needs a few decode steps"
    assert linear + attention == sequence_flops(lm.config, [len(prompt)], [R]) + _masked(lm, [len(prompt)])


def test_per_rank_flops_are_each_ranks_packed_sequences(random_batch):
    """With two ranks each counts what its own micro-batches pack (fillers excluded); together, one process's count
    when both split the same way (every group whole on one rank)."""
    lm = build_tiny_model(build_tokenizer(), seed=0)
    model, batch, seqs = HeadlessLM(lm), random_batch(lm.config.vocab_size), [0, 2, 3, 5]
    per_rank = []
    for rank in (0, 1):
        d = Dist(rank=rank, world=2, device=torch.device("cpu"), token_budget=24)
        packed = [mb for mb in micro_batches(batch, seqs, d) if not mb.filler]
        want = sum(
            packed_flops(
                lm.config,
                packed_attention.segments_from_positions(mb.position_ids),
                head_tokens=mb.head_targets.numel(),
            )
            for mb in packed
        )
        per_rank.append(own_flops(model, batch, seqs, d))
        assert per_rank[-1] == want, rank
    assert per_rank[0] > 0 and per_rank[1] > 0
    one = own_flops(model, batch, seqs, Dist(rank=0, world=1, device=torch.device("cpu"), token_budget=24))
    assert sum(per_rank) == one


def test_peak_table():
    assert bf16_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert bf16_peak("NVIDIA H200") == 989.4e12
    assert bf16_peak("NVIDIA A100-SXM4-80GB") == bf16_peak("NVIDIA A100 80GB PCIe") == 312e12
    assert bf16_peak("NVIDIA H100 NVL") is None
    assert bf16_peak("NVIDIA GeForce RTX 4090") is None


def test_model_flops_rates_by_hand():
    record = {
        "perf/policy_flops": 6e12,
        "time/policy_s": 2.0,
        "perf/prm_flops": 1e12,
        "perf/policy_tokens_per_s": 5,
    }
    # policy: 6e12 / 2 s = 3 TFLOP/s, / 10 TFLOP/s peak = 0.3; prm: no time, so no rate
    assert model_flops_rates(record, 10e12) == pytest.approx(
        {"perf/policy_tflops": 3.0, "perf/policy_mfu": 0.3}
    )
    assert model_flops_rates(record, None) == pytest.approx({"perf/policy_tflops": 3.0})


@pytest.mark.usefixtures("cpu_only")
def test_cpu_run_logs_model_tflops_and_no_mfu(tmp_path):
    from test_train import _run

    run = _run(tmp_path, "perf", "--train.iterations", "1", "--eval.every", "0")
    rec = read_metrics(run / "metrics.jsonl")[-1]
    assert rec["perf/policy_tflops"] > 0
    assert not [k for k in rec if k.endswith("_mfu")]
    for phase in ("rollout", "logprob_old", "logprob_ref", "prm"):
        assert rec[f"perf/{phase}_tflops"] > 0, phase
    # one process, one rollout round (no filter), reference = policy architecture: the no-grad passes read the
    # sequences the rollout generated, each prompt once per group (the HF engine prefills it per sample); the
    # PRM (update 'after') trains in the reference pass's mini-batches: 3x. The policy's shuffled mini-batches
    # split groups, so fewer responses share a packed prompt than in the old-log-prob pass over the whole batch.
    fwd = rec["perf/logprob_old_flops"]
    assert fwd <= rec["perf/logprob_ref_flops"] < rec["perf/rollout_flops"]
    assert rec["perf/prm_flops"] == 3 * rec["perf/logprob_ref_flops"]
    assert 3 * fwd <= rec["perf/policy_flops"] < 3 * rec["perf/rollout_flops"]


@pytest.mark.gpu
def test_gpu_run_logs_mfu_where_the_peak_is_known(tmp_path):
    """On CUDA (not run on the CPU-only development machine): a known GPU gets perf/<phase>_mfu, FLOPs over time
    and its bf16 peak; an unknown one gets none."""
    import json
    import subprocess
    import sys

    from test_train import REPO, TINY

    (tmp_path / "tiny.yaml").write_text(TINY)
    cmd = [sys.executable, str(REPO / "trainer" / "main.py"), "--config", str(tmp_path / "tiny.yaml")]
    cmd += ["--run.output-dir", str(tmp_path), "--run.name", "gpu", "--train.iterations", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rec = [json.loads(ln) for ln in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()][-1]
    peak = bf16_peak(torch.cuda.get_device_name())
    assert rec["perf/policy_tflops"] > 0
    if peak is None:
        assert not [k for k in rec if k.endswith("_mfu")]
        return
    for phase in ("rollout", "logprob_old", "logprob_ref", "prm", "policy"):
        want = rec[f"perf/{phase}_flops"] / (rec[f"time/{phase}_s"] * peak)
        assert rec[f"perf/{phase}_mfu"] == pytest.approx(want, rel=1e-9) and 0 < want < 1, phase
