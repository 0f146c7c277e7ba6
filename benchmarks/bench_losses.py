"""Forward+backward of the fused RL losses (PPO policy loss, implicit-PRM loss) against eager PyTorch and
liger-kernel's fused linear GRPO loss, at the log-prob benchmark's shapes.

Run: `python -m pytest benchmarks/ -k bench_losses --benchmark-enable` (the table is printed at the end; on a GPU
it is written to benchmarks/results/). GPU shapes skip without CUDA; the small CPU shapes run anywhere (the Triton
path is GPU-only here: under the CPU interpreter it measures the interpreter, not the kernel).
FLOPs counted for forward+backward: 6 N D V (logits, dh, dW); the epilogues are O(N).
"""

import pytest
import torch
from kernel_shapes import ON_CUDA, shape_params

from fastprime.kernels import aggregation_weights, linear_ppo_loss, linear_prm_loss

SEQ_LEN = 1024  # tokens per sequence: liger takes [B, T] batches, ours the same tokens packed as [N]
SHAPES = shape_params([(512, 256, 8192), (1024, 128, 32000)])
PPO_METHODS = ["eager", "chunked", "triton", "liger"]
PRM_METHODS = ["eager", "chunked", "triton"]
IMPL_OF = {"eager": "reference", "chunked": "chunked", "triton": "triton"}


def make_inputs(n, d, v, dtype):
    device = "cuda" if ON_CUDA else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(n, d, generator=g, device=device) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, device=device) / d**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    b = n // SEQ_LEN if n >= SEQ_LEN else 1
    seq = torch.arange(n, device=device) // (n // b)
    adv_seq = torch.randn(b, generator=g, device=device)  # GRPO-style: one advantage per sequence
    old_logp = -torch.rand(n, generator=g, device=device) * 8 - 2
    return hidden, weight, targets, seq, adv_seq, old_logp


def skip_unavailable(method):
    if method == "triton" and not ON_CUDA:
        pytest.skip("the Triton path is timed on CUDA only (the CPU interpreter is not a kernel)")
    if method == "liger":
        pytest.importorskip("liger_kernel.chunked_loss")


@pytest.mark.parametrize("method", PPO_METHODS)
@pytest.mark.parametrize("n, d, v, dtype", SHAPES)
def test_bench_ppo_fwd_bwd(measure, method, n, d, v, dtype):
    skip_unavailable(method)
    hidden, weight, targets, seq, adv_seq, old_logp = make_inputs(n, d, v, dtype)
    b = adv_seq.shape[0]
    if method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # "dapo" = token-mean over the batch, no KL (beta=0): the same loss as ours with token-mean weights.
        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", compiled=ON_CUDA)
        h3, t2 = hidden.view(b, n // b, d), targets.view(b, n // b)
        mask, old2 = torch.ones_like(t2), old_logp.view(b, n // b)

        def step():
            hidden.grad = weight.grad = None
            loss = loss_fn(h3, weight, t2, mask, adv_seq, old_per_token_logps=old2)[0]
            loss.backward()
    else:
        w = aggregation_weights(torch.ones(n, device=hidden.device), seq, mode="token-mean")
        adv = adv_seq[seq]

        def step():
            hidden.grad = weight.grad = None
            loss, _ = linear_ppo_loss(hidden, weight, targets, old_logp, adv, w, impl=IMPL_OF[method])
            loss.backward()

    measure(step, op="ppo_loss", shape=f"N={n} D={d} V={v}", dtype=str(dtype).removeprefix("torch."),
            method=method, mode="fwd+bwd", flops=6 * n * d * v)  # fmt: skip


@pytest.mark.parametrize("method", PRM_METHODS)
@pytest.mark.parametrize("n, d, v, dtype", SHAPES)
def test_bench_prm_fwd_bwd(measure, method, n, d, v, dtype):
    skip_unavailable(method)
    hidden, weight, targets, seq, adv_seq, old_logp = make_inputs(n, d, v, dtype)
    labels = (adv_seq > 0).float()

    def step():
        hidden.grad = weight.grad = None
        loss, _ = linear_prm_loss(hidden, weight, targets, old_logp, seq, labels, impl=IMPL_OF[method])
        loss.backward()

    measure(step, op="prm_loss", shape=f"N={n} D={d} V={v}", dtype=str(dtype).removeprefix("torch."),
            method=method, mode="fwd+bwd", flops=6 * n * d * v)  # fmt: skip
