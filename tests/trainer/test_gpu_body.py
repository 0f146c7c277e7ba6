"""GPU only: liger's body kernels leave the packed log-probs unchanged (fp32 model, 1e-4), and the phase timer
reports peak memory. Skipped without CUDA (and the liger test without liger-kernel)."""

import pytest
import torch

from fastprime.kernels import linear_logprobs
from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.liger import apply_body_kernels
from fastprime.trainer.metrics import Timer
from fastprime.trainer.models import HeadlessLM
from fastprime.trainer.packing import rank_micro_batches

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_liger_off_on_cpu():
    tok = build_tokenizer()
    assert apply_body_kernels(build_tiny_model(tok, seed=0), "cpu") == "liger: off (not on CUDA)"


@pytest.mark.gpu
@needs_cuda
def test_liger_body_kernels_keep_logprobs(random_batch):
    pytest.importorskip("liger_kernel")
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0).cuda()
    batch = random_batch(len(tok))
    mb = rank_micro_batches(
        batch.prompts, batch.responses, list(range(batch.n)), token_budget=4096, device="cuda"
    )[0]

    def logprobs(m):
        with torch.no_grad():
            return HeadlessLM(m)(
                mb.input_ids, mb.position_ids, lambda h, w, b: linear_logprobs(h, w, mb.head_targets), mb.pos
            )

    # Before patching: liger's RoPE patch replaces a function of the transformers module, for every model.
    want = logprobs(lm)
    assert "patched" in apply_body_kernels(lm, "cuda")
    # liger rebinds the instances' forward (the class stays Qwen2RMSNorm / Qwen2MLP)
    for module in (lm.model.norm, lm.model.layers[0].mlp, lm.model.layers[0].input_layernorm):
        assert module.forward.__func__ is not type(module).forward
    torch.testing.assert_close(logprobs(lm), want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_timer_reports_peak_memory_per_phase():
    timer = Timer(torch.device("cuda"))
    with timer("policy"):
        x = torch.empty(256, 1024, 1024, device="cuda")  # 1 GiB
        del x
    assert timer.times["mem/policy_peak_gib"] >= 1.0
