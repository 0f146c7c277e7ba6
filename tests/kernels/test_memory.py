"""Structural memory tests: the chunked and Triton paths never allocate a [tokens x vocab] tensor and save
only O(tokens) state for backward; the recorder is shown to catch the eager reference doing it."""

import pytest
import torch
from memory_probe import AllocationRecorder

from fastprime.kernels import linear_logprobs
from fastprime.kernels.triton_core import G_BUDGET_BYTES, vocab_chunk

ON_CUDA = torch.cuda.is_available()


def run_fwd_bwd(impl, n, d, v, device):
    """Forward + backward through both outputs; returns the recorder of all allocations made meanwhile."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        if device == "meta":
            return torch.empty(*shape, device="meta", requires_grad=True)
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    hidden, weight, bias = leaf(n, d), leaf(v, d), leaf(v)
    targets = torch.zeros(n, dtype=torch.long, device=device)
    with AllocationRecorder() as rec:
        logp, entropy = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, impl=impl)
        (logp.sum() + entropy.sum()).backward()
    return rec


# N=4096, V=65536: eager would hold 268M-element logits (1 GiB fp32, several times over in backward).
# On "meta" the run has shapes only, so it takes milliseconds.
BIG = dict(n=4096, d=8, v=65536, device="meta")


def test_recorder_catches_eager_reference():
    rec = run_fwd_bwd("reference", **BIG)
    assert rec.at_least(BIG["n"] * BIG["v"]), f"recorder missed the eager logits; largest: {rec.describe()}"


def test_chunked_never_allocates_tokens_x_vocab():
    rec = run_fwd_bwd("chunked", **BIG)
    big = rec.at_least(BIG["n"] * BIG["v"])
    assert not big, f"chunked path allocated {big[:3]}"
    # One chunk of logits is bounded by the token budget (2^23 elements), far below N x V here.
    assert rec.largest().numel <= 1 << 23, rec.describe()


def test_triton_never_allocates_tokens_x_vocab():
    """The Triton backward's peak extra memory is O(N + chunk) (formula in triton_core.py's docstring): one
    logit-gradient buffer G [N, Vc] reused across the vocab chunks, within G_BUDGET_BYTES, besides dh [N, D] and
    the weight gradient [V, D] themselves; never a [N, V] tensor, not even in pieces that add up to one."""
    # The interpreter is slow, so a small shape on CPU (its budget still gives 5 chunks); on CUDA a big one.
    n, d, v, device = (4096, 64, 262144, "cuda") if ON_CUDA else (64, 16, 20011, "cpu")
    rec = run_fwd_bwd("triton", n, d, v, device)
    assert not rec.at_least(n * v), f"triton path allocated a tokens x vocab tensor: {rec.describe()}"
    vc = vocab_chunk(n, v, 4)  # fp32 inputs: G in fp32
    assert vc < v and n * vc * 4 <= G_BUDGET_BYTES
    g_buffers = [a for a in rec.allocations if a.shape == (n, vc)]
    assert len(g_buffers) == 1, f"expected one G [N, Vc] buffer for all chunks: {rec.describe(8)}"
    # Nothing larger than the weight gradient [V, D], dh [N, D] or that one chunk of G.
    assert rec.largest().numel <= max(v * d, n * d, n * vc), rec.describe()


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_saved_for_backward_is_inputs_plus_per_token_state(impl):
    n, d, v = 32, 16, 1000
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = torch.randn(v, d, generator=g).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    inputs = {hidden.data_ptr(), weight.data_ptr(), targets.data_ptr()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_logprobs(hidden, weight, targets, return_entropy=True, impl=impl)
    extra = [tuple(t.shape) for t in saved if t.data_ptr() not in inputs]
    assert saved and all(t.numel() <= n for t in saved if t.data_ptr() not in inputs), (
        f"saved beyond inputs: {extra}"
    )


@pytest.mark.gpu
def test_gpu_backward_peak_memory_within_the_stated_formula():
    """bf16, measured: the backward's peak memory beyond what existed before it and beyond the two gradients
    it returns is at most N Vc b (one chunk of G) + 8 N D (fp32 dh and one fp32 product) + O(N), as
    triton_core.py states. Measured on a second run: the first one autotunes (Triton's timing allocates)."""
    n, d, v = 8192, 1024, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    for _ in range(2):
        hidden.grad = weight.grad = None
        logp = linear_logprobs(hidden, weight, targets, impl="triton")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        logp.sum().backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before - 2 * (hidden.numel() + weight.numel())
    stated = n * vocab_chunk(n, v, 2) * 2 + 8 * n * d + 64 * n * 4
    assert extra <= stated, f"backward peak extra {extra / 2**20:.0f} MiB > stated {stated / 2**20:.0f} MiB"
