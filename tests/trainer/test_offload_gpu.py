"""model.offload (CUDA only): an offloaded FSDP2 model keeps its shards in CPU memory and computes what the
GPU-resident one computes; its optimizer steps on the CPU shards. Not run on the CPU-only development machine."""

import copy

import pytest
import torch

from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.models import shard_model
from fastprime.trainer.passes import logprob_pass, micro_batches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="model.offload needs CUDA"),
]


def test_offloaded_model_lives_on_cpu_and_matches_the_gpu_one(cuda_group_of_one, random_batch):
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=0)
    d = cuda_group_of_one
    kw = dict(device=d.device, mixed_precision=False)
    on_gpu = shard_model(copy.deepcopy(lm), trainable=True, **kw)
    offloaded = shard_model(copy.deepcopy(lm), trainable=True, offload=True, **kw)
    assert all(p.to_local().device.type == "cpu" for p in offloaded.parameters())
    d.token_budget = 4096
    batch = random_batch(len(tok))
    want, _ = logprob_pass(on_gpu, batch, d, temperature=1.0)
    got, _ = logprob_pass(offloaded, batch, d, temperature=1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a training step on the offloaded shards: gradients and AdamW states stay on the CPU
    opt = torch.optim.AdamW(offloaded.parameters(), lr=1e-2)
    before = [p.to_local().clone() for p in offloaded.parameters()]
    for mb in micro_batches(batch, list(range(batch.n)), d):
        offloaded(mb.input_ids, mb.position_ids, lambda h, w, b: (h @ w.T).float().pow(2).mean()).backward()
    opt.step()
    assert any(not torch.equal(b, p.to_local()) for b, p in zip(before, offloaded.parameters()))
    states = [s for st in opt.state.values() for s in st.values() if isinstance(s, torch.Tensor) and s.dim()]
    assert states and all(s.device.type == "cpu" for s in states)
