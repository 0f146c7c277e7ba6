"""linear_logprobs, every implementation (reference, chunked, Triton) vs the independent fp64 oracle.

The Triton path runs under TRITON_INTERPRET=1 on a CPU (set by tests/conftest.py), natively on CUDA.
"""

import pytest
import torch
from oracle import DEVICE, TOL, assert_close, check_against_oracle, fp64_oracle, make_inputs

from fastprime.kernels import linear_logprobs

IMPLS = ["reference", "chunked", "triton"]


# Keep N and D tiny: the Triton path runs in the interpreter here.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("n", "d", "v"), [(20, 24, 1000), (24, 16, 4099), (16, 32, 32003)])
def test_vocab_sizes_fp32(impl, n, d, v):
    hidden, weight, bias, targets = make_inputs(n, d, v)
    check_against_oracle(impl, hidden, weight, bias, targets, temperature=0.7, dtype=torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperatures_without_bias(impl, temperature):
    hidden, weight, bias, targets = make_inputs(17, 20, 1000, seed=3)
    check_against_oracle(
        impl, hidden, weight, bias, targets, temperature=temperature, dtype=torch.float32, use_bias=False
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("scale", "bias_shift"),
    # peaked: logits spread over hundreds of nats; very negative: every tempered logit is below -88.
    [(30.0, 0.0), (1.0, -200.0)],
    ids=["peaked", "very_negative"],
)
def test_extreme_logits(impl, scale, bias_shift):
    hidden, weight, bias, targets = make_inputs(16, 16, 1000, scale=scale, bias_shift=bias_shift, seed=4)
    check_against_oracle(impl, hidden, weight, bias, targets, temperature=0.9, dtype=torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16(impl):
    hidden, weight, bias, targets = make_inputs(20, 32, 4099, dtype=torch.float16, seed=5)
    check_against_oracle(impl, hidden, weight, bias, targets, temperature=0.8, dtype=torch.float16)


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_batch_dims(impl):
    hidden, weight, bias, targets = make_inputs(5, 16, 1000, lead=(2, 3), seed=6)
    check_against_oracle(impl, hidden, weight, bias, targets, temperature=1.3, dtype=torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_ignored_input_gives_zeros(impl):
    hidden, weight, bias, _ = make_inputs(8, 16, 1000, seed=7)
    targets = torch.full((8,), -100, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logp, entropy = linear_logprobs(*leaves[:2], targets, bias=leaves[2], return_entropy=True, impl=impl)
    (logp.sum() + entropy.sum()).backward()
    for name, t in zip(
        ["logp", "entropy", "d hidden", "d weight", "d bias"], [logp, entropy] + [x.grad for x in leaves]
    ):
        assert torch.count_nonzero(t) == 0, (
            f"{impl} {name} should be all zero, max |.| = {t.abs().max().item()}"
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_targets_and_strided_hidden(impl):
    """int32 targets and a non-contiguous hidden (every other feature of a wider tensor) are accepted."""
    wide, weight, bias, targets = make_inputs(9, 32, 1000, seed=17)
    weight = weight[:, :16].contiguous()
    hidden = wide[:, ::2]
    logp = linear_logprobs(hidden, weight, targets.int(), bias=bias, impl=impl)
    assert_close(f"{impl} logp", logp, fp64_oracle(hidden, weight, targets, bias, 1.0)[0], 2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_weight_and_bias(impl):
    """A weight with a row stride > D and a bias that is every other element of a wider tensor (the kernels
    index bias by column, so it must be made contiguous first); values and the bias gradient."""
    hidden, wide_w, _, targets = make_inputs(9, 32, 1000, seed=18)
    hidden, weight = hidden[:, :16].contiguous(), wide_w[:, :16]
    wide_b = torch.randn(1000, 2, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_()
    logp = linear_logprobs(hidden, weight, targets, bias=wide_b[:, 0], temperature=0.8, impl=impl)
    b64 = wide_b.detach()[:, 0].double().requires_grad_()
    want = fp64_oracle(hidden, weight, targets, b64, 0.8)[0]
    assert_close(f"{impl} logp", logp, want, TOL[torch.float32]["value"])
    (grad_b,) = torch.autograd.grad(logp.sum(), wide_b)
    (want_b,) = torch.autograd.grad(want.sum(), b64)
    assert_close(f"{impl} d bias", grad_b[:, 0], want_b, TOL[torch.float32]["grad"])


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_input(impl):
    hidden, weight, bias, targets = make_inputs(0, 16, 1000, lead=(3,))
    h = hidden.clone().requires_grad_()
    logp, entropy = linear_logprobs(h, weight, targets, bias=bias, return_entropy=True, impl=impl)
    assert logp.shape == entropy.shape == (3, 0)
    (logp.sum() + entropy.sum()).backward()
    assert h.grad.shape == h.shape


@pytest.mark.parametrize("impl", IMPLS)
def test_single_output_paths(impl):
    """Gradient through logp alone (return_entropy=False) and through entropy alone (logp unused)."""
    hidden, weight, bias, targets = make_inputs(12, 16, 1000, seed=8)
    h = hidden.clone().requires_grad_()
    logp = linear_logprobs(h, weight, targets, bias=bias, impl=impl)
    (grad_h,) = torch.autograd.grad(logp.sum(), h)
    h64 = hidden.double().requires_grad_()
    ref_logp, ref_entropy = fp64_oracle(h64, weight, targets, bias, 1.0)
    assert_close(
        f"{impl} logp-only d hidden",
        grad_h,
        torch.autograd.grad(ref_logp.sum(), h64, retain_graph=True)[0],
        1e-4,
    )
    h = hidden.clone().requires_grad_()
    _, entropy = linear_logprobs(h, weight, targets, bias=bias, return_entropy=True, impl=impl)
    (grad_h,) = torch.autograd.grad(entropy.sum(), h)
    assert_close(
        f"{impl} entropy-only d hidden", grad_h, torch.autograd.grad(ref_entropy.sum(), h64)[0], 1e-4
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_dtypes(dtype):
    hidden, weight, bias, targets = make_inputs(300, 256, 32003, dtype=dtype, seed=14)
    check_against_oracle("triton", hidden, weight, bias, targets, temperature=0.7, dtype=dtype)


@pytest.mark.gpu
def test_gpu_large_shape_bf16():
    """A Qwen2.5-0.5B-like head (V=151936, D=896) on 2048 tokens, bf16, vs the fp64 oracle."""
    hidden, weight, bias, targets = make_inputs(2048, 896, 151936, dtype=torch.bfloat16, seed=15)
    check_against_oracle("triton", hidden, weight, bias, targets, temperature=1.0, dtype=torch.bfloat16)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_fp16_gradients_keep_precision_for_tiny_upstream_grads(impl):
    """Token-mean losses give each token an upstream grad ~1/tokens. In fp16 the per-logit coefficients
    g (onehot - p) are then subnormal; a path that casts them to fp16 unscaled keeps ~7 bits and was 4-7x less
    accurate than the floor (the fp64 gradient rounded once to fp16, the output dtype). Both paths must stay
    near that floor."""
    hidden, weight, _, targets = make_inputs(64, 64, 1000, dtype=torch.float16, scale=2.0, ignore_frac=0.0)
    grad = torch.randn(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE) * 1e-4
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp64, _ = fp64_oracle(h64, w64, targets, None, 1.0)
    want_h, want_w = torch.autograd.grad((logp64 * grad).sum(), (h64, w64))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got_h, got_w = torch.autograd.grad(
        (linear_logprobs(h, w, targets, impl=impl) * grad.float()).sum(), (h, w)
    )
    for got, want in ((got_h, want_h), (got_w, want_w)):
        floor = (want.half().double() - want).norm() / want.norm()
        err = (got.double() - want).norm() / want.norm()
        assert err <= 1.5 * floor, (err.item(), floor.item())
