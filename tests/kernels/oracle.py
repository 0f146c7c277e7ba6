"""The independent fp64 oracle of the kernel tests and the input makers they share.

The oracle is written here in float64 with plain torch (not fastprime's reference module), on the same
(possibly fp16-rounded) inputs, so only the kernels' own arithmetic is measured.
"""

import torch

from fastprime.kernels import linear_logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Largest allowed error relative to the largest |value| of each output (values: fp32 logits either way).
TOL = {
    torch.float32: {"value": 2e-5, "grad": 1e-4},
    torch.float16: {"value": 2e-5, "grad": 5e-3},
    torch.bfloat16: {"value": 2e-5, "grad": 3e-2},
}


def fp64_oracle(hidden, weight, targets, bias, temperature, ignore_index=-100):
    """float64 (logp, entropy), 0 at ignored positions; differentiable."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    logprobs = torch.log_softmax(z / temperature, -1)
    keep = targets != ignore_index
    logp = logprobs.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)


def make_inputs(n, d, v, *, dtype=torch.float32, scale=1.0, bias_shift=0.0, ignore_frac=0.2, lead=(), seed=0):
    """hidden [*lead, n, d] * scale, weight [v, d] / sqrt(d), bias [v] (+ bias_shift), targets with ignores."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, n, d, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype)
    bias = torch.randn(v, generator=g) + bias_shift
    targets = torch.randint(0, v, (*lead, n), generator=g)
    targets[torch.rand(*lead, n, generator=g) < ignore_frac] = -100
    return [t.to(DEVICE) for t in (hidden, weight, bias, targets)]


def upstream_grads(shape, seed=1):
    """Random upstream grads on logp and entropy, with about a quarter of them exactly zero."""
    g = torch.Generator().manual_seed(seed)
    gl, ge = (
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.randn(shape, generator=g, dtype=torch.float64),
    )
    gl[torch.rand(shape, generator=g) < 0.25] = 0.0
    ge[torch.rand(shape, generator=g) < 0.25] = 0.0
    return gl.to(DEVICE), ge.to(DEVICE)


def assert_close(name, got, want, tol):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    scale = want.abs().max().clamp_min(1e-3).item()
    worst = err.argmax().item()
    assert err.max().item() <= tol * scale, (
        f"{name}: max error {err.max().item():.3e} at flat index {worst} (got {got.flatten()[worst].item():.6g}, "
        f"want {want.flatten()[worst].item():.6g}) exceeds {tol:g} x {scale:.3g}"
    )


def check_against_oracle(impl, hidden, weight, bias, targets, *, temperature, dtype, use_bias=True):
    """Forward values and all three gradients through both outputs vs the fp64 oracle."""
    bias = bias if use_bias else None
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    leaves.append(bias.detach().clone().requires_grad_() if bias is not None else None)
    logp, entropy = linear_logprobs(
        leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature, return_entropy=True, impl=impl
    )
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    ref_logp, ref_entropy = fp64_oracle(ref_leaves[0], ref_leaves[1], targets, ref_leaves[2], temperature)
    tol = TOL[dtype]
    assert_close(f"{impl} logp", logp, ref_logp, tol["value"])
    assert_close(f"{impl} entropy", entropy, ref_entropy, tol["value"])
    gl, ge = upstream_grads(logp.shape)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((logp.double() * gl).sum() + (entropy.double() * ge).sum(), wanted)
    ref_wanted = [t for t in ref_leaves if t is not None]
    ref_grads = torch.autograd.grad((ref_logp * gl).sum() + (ref_entropy * ge).sum(), ref_wanted)
    for name, got, want, leaf in zip(["d hidden", "d weight", "d bias"], grads, ref_grads, wanted):
        assert got.dtype == leaf.dtype, f"{impl} {name}: dtype {got.dtype} != input dtype {leaf.dtype}"
        assert_close(f"{impl} {name}", got, want, tol["grad"])
