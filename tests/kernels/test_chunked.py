"""The chunked pure-PyTorch core (chunked.py) vs the fp64 oracle: gradcheck and chunk boundaries."""

import torch
from oracle import assert_close, fp64_oracle, make_inputs, upstream_grads

from fastprime.kernels import linear_logprobs
from fastprime.kernels.chunked import chunked_logprobs_backward, chunked_logprobs_forward


def test_fp64_gradcheck_chunked():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (6,), generator=g)
    t[1] = -100
    fn = lambda h, w, b: linear_logprobs(
        h, w, t, bias=b, temperature=0.7, return_entropy=True, impl="chunked"
    )
    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_chunked_core_across_chunk_boundaries():
    """Several chunks (5 rows each over 23 rows) give the oracle's values, lse and gradients."""
    hidden, weight, bias, targets = make_inputs(23, 16, 1000, seed=9)
    opts = dict(temperature=0.6, ignore_index=-100, chunk_elements=5 * 1000)
    logp, entropy, lse = chunked_logprobs_forward(hidden, weight, targets, bias, need_entropy=True, **opts)
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    ref_logp, ref_entropy = fp64_oracle(h64, w64, targets, b64, 0.6)
    ref_lse = torch.logsumexp((h64 @ w64.T + b64) / 0.6, -1)
    for name, got, want in [
        ("logp", logp, ref_logp),
        ("entropy", entropy, ref_entropy),
        ("lse", lse, ref_lse),
    ]:
        assert_close(f"chunked core {name}", got, want, 2e-5)
    gl, ge = upstream_grads(23)
    grads = chunked_logprobs_backward(
        hidden,
        weight,
        targets,
        bias,
        lse,
        entropy,
        gl.float(),
        ge.float(),
        needs_input_grad=(True, True, True),
        **opts,
    )
    ref_grads = torch.autograd.grad((ref_logp * gl).sum() + (ref_entropy * ge).sum(), (h64, w64, b64))
    for name, got, want in zip(["d hidden", "d weight", "d bias"], grads, ref_grads):
        assert_close(f"chunked core {name}", got, want, 1e-4)
