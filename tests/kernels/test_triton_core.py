"""The Triton core (triton_core.py) beyond the public op's tests: vocab splits of the forward, vocab chunks of
the backward, autotuning hooks, and the inputs it refuses."""

import pytest
import torch
import triton
from oracle import TOL, assert_close, check_against_oracle, fp64_oracle, make_inputs, upstream_grads
from torch.utils._python_dispatch import TorchDispatchMode

from fastprime.kernels import linear_logprobs
from fastprime.kernels.triton_core import triton_logprobs_backward, triton_logprobs_forward


def test_triton_backward_survives_autotuning(monkeypatch):
    """On a GPU the logit-gradient kernel has several configs and the autotuner runs each one on the real
    arguments before the real launch. Here two configs are forced and each is "timed" by one plain call, so the
    interpreter goes through the same path: the gradients must still equal the oracle's (every config writes
    all of G, so no run may leave stale entries), with and without a weight gradient."""
    from fastprime.kernels import triton_core as lt

    kernel = lt._logit_grad_kernel
    first = kernel.configs[0]
    configs = [first, triton.Config({**first.kwargs, "BLOCK_N": 2 * first.kwargs["BLOCK_N"]})]
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.delitem(kernel.__dict__, "do_bench", raising=False)

    def bench_once(kernel_call, quantiles):
        kernel_call()
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(kernel, "_do_bench", bench_once)
    hidden, weight, _, targets = make_inputs(20, 16, 1000, seed=19)
    check_against_oracle(
        "triton", hidden, weight, None, targets, temperature=1.0, dtype=torch.float32, use_bias=False
    )
    assert len(kernel.cache) == 1, "the autotuner did not run"
    h = hidden.clone().requires_grad_()
    (grad_h,) = torch.autograd.grad(linear_logprobs(h, weight, targets, impl="triton").sum(), h)
    h64 = hidden.double().requires_grad_()
    (want,) = torch.autograd.grad(fp64_oracle(h64, weight, targets, None, 1.0)[0].sum(), h64)
    assert_close("triton d hidden (weight frozen)", grad_h, want, TOL[torch.float32]["grad"])


def test_triton_vocab_splits_merge():
    """The host merge of per-split partials equals one pass (splits include a short last one)."""
    hidden, weight, bias, targets = make_inputs(16, 16, 4099, seed=11)
    ref_logp, ref_entropy = fp64_oracle(hidden, weight, targets, bias, 0.8)
    for splits in (1, 3, 5):
        logp, entropy, _ = triton_logprobs_forward(
            hidden,
            weight,
            targets,
            bias,
            temperature=0.8,
            ignore_index=-100,
            need_entropy=True,
            n_split=splits,
        )
        assert_close(f"{splits} splits logp", logp, ref_logp, 2e-5)
        assert_close(f"{splits} splits entropy", entropy, ref_entropy, 2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backward_vocab_chunks(dtype):
    """Backward launched per 1000-row vocab chunk (last one 99 rows) equals the fp64 oracle."""
    hidden, weight, bias, targets = make_inputs(16, 16, 4099, dtype=dtype, seed=16)
    opts = dict(temperature=0.8, ignore_index=-100)
    logp, entropy, lse = triton_logprobs_forward(hidden, weight, targets, bias, need_entropy=True, **opts)
    gl, ge = upstream_grads(16)
    grads = triton_logprobs_backward(
        hidden, weight, targets, bias, lse, entropy, gl.float(), ge.float(),
        needs_input_grad=(True, True, True), v_chunk=1000, **opts,
    )  # fmt: skip
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    ref_logp, ref_entropy = fp64_oracle(h64, w64, targets, b64, 0.8)
    ref_grads = torch.autograd.grad((ref_logp * gl).sum() + (ref_entropy * ge).sum(), (h64, w64, b64))
    for name, got, want in zip(["d hidden", "d weight", "d bias"], grads, ref_grads):
        assert_close(f"chunked-vocab triton {name}", got, want, TOL[dtype]["grad"])


def test_triton_rejects_float64():
    h, w = torch.randn(2, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        linear_logprobs(h, w, torch.zeros(2, dtype=torch.long), impl="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only guard")
def test_interpreter_refuses_bf16_triton():
    h, w = torch.randn(2, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    with pytest.raises(ValueError, match="bfloat16"):
        linear_logprobs(h, w, torch.zeros(2, dtype=torch.long), impl="triton")


class _OpLog(TorchDispatchMode):
    """Names and operand shapes of every aten op run while active."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.calls.append((str(func.overloadpacket.__name__), shapes))
        return func(*args, **(kwargs or {}))


def test_triton_backward_is_matmuls_over_logit_gradient_chunks():
    """The backward writes G [N, Vc] per vocab chunk and gets dh, dW from matrix multiplies over it: one
    dh product (addmm) and one dW product (mm) per chunk, each with G's chunk as an operand."""
    n, d, v, vc = 24, 16, 4099, 1000
    hidden, weight, bias, targets = make_inputs(n, d, v, seed=20)
    opts = dict(temperature=0.8, ignore_index=-100)
    logp, entropy, lse = triton_logprobs_forward(hidden, weight, targets, bias, need_entropy=True, **opts)
    gl, ge = upstream_grads(n)
    with _OpLog() as log:
        triton_logprobs_backward(
            hidden, weight, targets, bias, lse, entropy, gl.float(), ge.float(),
            needs_input_grad=(True, True, True), v_chunk=vc, **opts,
        )  # fmt: skip
    chunks = [min(vc, v - v0) for v0 in range(0, v, vc)]
    dh_products = [s[1:] for name, s in log.calls if name.startswith("addmm") and s[0] == (n, d)]
    dw_products = [s for name, s in log.calls if name == "mm" and s[1] == (n, d)]
    assert dh_products == [[(n, c), (c, d)] for c in chunks], log.calls
    assert dw_products == [[(c, n), (n, d)] for c in chunks], log.calls


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    """No atomics: two backward passes on the same bf16 inputs give bitwise equal gradients."""
    hidden, weight, bias, targets = make_inputs(1000, 512, 32003, dtype=torch.bfloat16, seed=21)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        logp, entropy = linear_logprobs(
            *leaves[:2], targets, bias=leaves[2], return_entropy=True, impl="triton"
        )
        grads.append(torch.autograd.grad(logp.sum() + 0.1 * entropy.sum(), leaves))
    for name, a, b in zip(["d hidden", "d weight", "d bias"], *grads):
        assert torch.equal(a, b), f"{name} differs between two identical backward passes"


def test_grouped_launch_order_covers_every_tile():
    """11 row blocks (the last group of GROUP_N=8 has 3) x 3 vocab splits in the forward and 11 x 2 tiles per
    vocab chunk in the backward: a tile missed or done twice by the grouped order would show in the values."""
    n = 10 * 16 + 3  # the interpreter's BLOCK_N is 16
    hidden, weight, bias, targets = make_inputs(n, 16, 1500, seed=22)
    opts = dict(temperature=1.0, ignore_index=-100)
    logp, entropy, lse = triton_logprobs_forward(
        hidden, weight, targets, bias, need_entropy=True, n_split=3, **opts
    )
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    ref_logp, ref_entropy = fp64_oracle(h64, w64, targets, b64, 1.0)
    assert_close("grouped logp", logp, ref_logp, 2e-5)
    assert_close("grouped entropy", entropy, ref_entropy, 2e-5)
    gl, ge = upstream_grads(n)
    grads = triton_logprobs_backward(
        hidden, weight, targets, bias, lse, entropy, gl.float(), ge.float(),
        needs_input_grad=(True, True, True), v_chunk=1024, **opts,
    )  # fmt: skip
    ref_grads = torch.autograd.grad((ref_logp * gl).sum() + (ref_entropy * ge).sum(), (h64, w64, b64))
    for name, got, want in zip(["d hidden", "d weight", "d bias"], grads, ref_grads):
        assert_close(f"grouped {name}", got, want, TOL[torch.float32]["grad"])
