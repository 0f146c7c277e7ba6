"""linear_logprobs: forward and forward+backward of every implementation against the eager reference.

Methods: eager (what HF-style trainers do: logits = h @ W^T in the input dtype, then fp32 log_softmax; the
baseline of the speed and memory ratios), reference (fastprime's fp32 eager specification), chunked (this
project, pure PyTorch), compiled_chunked (torch.compile of one chunk, checkpointed per chunk), triton (this
project, CUDA), liger (liger-kernel's fused linear cross-entropy, CUDA), cce (cut-cross-entropy, where
installed). All compute the per-token log-prob of the
target (liger and cce as a summed cross-entropy, which is -sum logp); fwd+bwd differentiates the sum w.r.t.
hidden and weight. FLOPs counted: 2NDV forward, 6NDV forward+backward (what any method must do at least).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from kernel_shapes import ON_CUDA, shape_params
from torch.utils.checkpoint import checkpoint

from fastprime.kernels import linear_logprobs
from fastprime.kernels.chunked import chunk_rows

DEVICE = "cuda" if ON_CUDA else "cpu"
SHAPES = shape_params([(256, 128, 8192), (512, 256, 32000)])
METHODS = ["eager", "reference", "chunked", "compiled_chunked", "triton", "liger", "cce"]


def eager_logp(hidden, weight, targets):
    """[N] log-probs the usual way: [N, V] logits in the input dtype, upcast, log_softmax, gather."""
    return torch.log_softmax((hidden @ weight.T).float(), -1).gather(1, targets[:, None]).squeeze(1)


def _chunk_logp(h, w, t):
    z = (h @ w.T).float()
    return z.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(z, -1)


_compiled_chunk_logp = torch.compile(_chunk_logp, dynamic=False)


def compiled_chunked_logp(hidden, weight, targets):
    """torch.compile'd chunk, recomputed in backward (checkpoint) so only one chunk of logits is live."""
    rows = chunk_rows(weight.shape[0], hidden.device)
    outs = [
        checkpoint(
            _compiled_chunk_logp, hidden[i : i + rows], weight, targets[i : i + rows], use_reentrant=False
        )
        for i in range(0, hidden.shape[0], rows)
    ]
    return torch.cat(outs)


def logp_fn(method: str):
    """method -> f(hidden, weight, targets) returning a scalar whose gradient is that of sum(logp)."""
    if method == "eager":
        return lambda h, w, t: eager_logp(h, w, t).sum()
    if method in ("reference", "chunked", "triton"):
        return lambda h, w, t: linear_logprobs(h, w, t, impl=method).sum()
    if method == "compiled_chunked":
        return lambda h, w, t: compiled_chunked_logp(h, w, t).sum()
    if method == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="sum")
    if method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="sum")
    raise ValueError(f"unknown method {method!r}")


def skip_reason(method: str) -> str | None:
    if method in ("triton", "liger") and not ON_CUDA:
        return f"{method} runs on CUDA only (the Triton interpreter is not a benchmark)"
    if method == "cce" and (not ON_CUDA or importlib.util.find_spec("cut_cross_entropy") is None):
        return "cut-cross-entropy is not installed or there is no GPU"
    return None


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("n", "d", "v", "dtype"), SHAPES)
def test_linear_logprobs(measure, n, d, v, dtype, method, mode):
    if reason := skip_reason(method):
        pytest.skip(reason)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(n, d, device=DEVICE, generator=g).to(dtype)
    weight = (torch.randn(v, d, device=DEVICE, generator=g) / d**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    fn = logp_fn(method)
    if mode == "fwd":

        def call():
            with torch.no_grad():
                return fn(hidden, weight, targets)

        flops = 2 * n * d * v
        grad_bytes = 0
    else:
        hidden.requires_grad_()
        weight.requires_grad_()

        def call():
            hidden.grad = weight.grad = None
            fn(hidden, weight, targets).backward()

        flops = 6 * n * d * v
        # The gradients of hidden and weight are outputs, not overhead: "extra memory" leaves them out.
        grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    measure(
        call, op="linear_logprobs", shape=f"N={n} D={d} V={v}", dtype=str(dtype).removeprefix("torch."),
        method=method, mode=mode, flops=flops, rounds=5 if ON_CUDA else 3, exclude_bytes=grad_bytes,
    )  # fmt: skip
