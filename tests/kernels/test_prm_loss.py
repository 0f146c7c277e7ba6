"""linear_prm_loss against an fp64 eager reference written here: loss, q and gradients for hidden, weight, bias."""

import math

import pytest
import torch
from devices import CUDA, kernel_device, to_kernel_device
from memory_probe import AllocationRecorder

from fastprime.kernels import linear_prm_loss
from fastprime.kernels.triton_core import vocab_chunk

IMPLS = ["reference", "chunked", "triton"]


def fp64_prm(h, W, b, targets, ref, seq, labels, *, beta, T, ignore=-100, n=None):
    """Loop over sequences in fp64: score_s = beta Σ (logp - ref), BCE(sigmoid(score), y) averaged over sequences."""
    z = (h.double() @ W.double().T + (0 if b is None else b.double())) / T
    logprobs = torch.log_softmax(z, -1)
    member = (targets != ignore) & (seq >= 0)
    logp = logprobs.gather(-1, targets.clamp(min=0)[:, None])[:, 0]
    q = torch.where(member, logp - ref, torch.zeros((), dtype=torch.float64))
    losses = []
    for s in range(labels.shape[0]):
        tok = member & (seq == s)
        if tok.any():
            x, y = beta * q[tok].sum(), labels[s].double()
            # -(y log p + (1 - y) log(1 - p)) with p = sigmoid(x); log sigmoid keeps long sequences finite
            losses.append(
                -(y * torch.nn.functional.logsigmoid(x) + (1 - y) * torch.nn.functional.logsigmoid(-x))
            )
    n = len(losses) if n is None else n
    return torch.stack(losses).sum() / n, q


def make_batch(seed, *, lengths=(1, 40, 3, 17, 1, 8), D=16, V=37, bias=True, soft=True, T=1.0):
    """Packed sequences of very different lengths (incl. length 1), prompt tokens (seq -1), ignored targets,
    and a sequence id (S - 1) with no token present."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for s, n in enumerate(lengths):
        parts += [torch.full((2,), -1), torch.full((n,), s)]  # a 2-token "prompt" before each response
    seq = torch.cat(parts)
    N = seq.shape[0]
    S = len(lengths) + 1
    h = torch.randn(N, D, generator=g) * 0.8
    W = torch.randn(V, D, generator=g) * 0.6
    b = torch.randn(V, generator=g) * 0.3 if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[(torch.rand(N, generator=g) < 0.15) & (seq != 0) & (seq != 4)] = -100  # keep the length-1 ones
    ref = -torch.rand(N, generator=g, dtype=torch.float64) * 4 - 1
    labels = torch.rand(S, generator=g) if soft else (torch.rand(S, generator=g) > 0.5).float()
    return h, W, b, targets, ref, seq, labels, T


CASES = {
    "soft": dict(soft=True),
    "hard": dict(soft=False),
    "hard_T0.6_beta0.5": dict(soft=False, T=0.6, beta=0.5),
    "soft_nobias_beta2": dict(soft=True, bias=False, beta=2.0),
}


def assert_close(actual, expected, what, rtol=2e-5, atol_scale=2e-5):
    atol = atol_scale * float(expected.detach().abs().max().clamp(min=1e-3))
    torch.testing.assert_close(
        actual.double().cpu(), expected.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_loss_q_and_grads_match_fp64(impl, case):
    cfg = dict(CASES[case])
    beta = cfg.pop("beta", 0.05)
    h, W, b, targets, ref, seq, labels, T = make_batch(0, **cfg)
    dev = kernel_device(impl)
    ht, Wt = h.to(dev).clone().requires_grad_(), W.to(dev).clone().requires_grad_()
    bt = b.to(dev).clone().requires_grad_() if b is not None else None
    k_targets, k_ref, k_seq, k_labels = to_kernel_device(impl, targets, ref.float(), seq, labels)
    loss, q = linear_prm_loss(
        ht, Wt, k_targets, k_ref, k_seq, k_labels, beta=beta, temperature=T, bias=bt, impl=impl
    )
    loss.backward()
    h64, W64 = h.double().requires_grad_(), W.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    loss64, q64 = fp64_prm(h64, W64, b64, targets, ref, seq, labels, beta=beta, T=T)
    loss64.backward()
    assert loss.shape == () and q.shape == targets.shape and not q.requires_grad
    assert_close(loss, loss64, "loss")
    assert_close(q, q64, "q")
    assert_close(ht.grad, h64.grad, "grad hidden")
    assert_close(Wt.grad, W64.grad, "grad weight")
    if b is not None:
        assert_close(bt.grad, b64.grad, "grad bias")
    outside = (seq < 0) | (targets == -100)
    assert torch.all(q.cpu()[outside] == 0) and torch.all(ht.grad.cpu()[outside] == 0)


def test_hand_computed_single_token_sequence():
    """One sequence of one token over a 2-word vocab with zero logits: logp = log 1/2, everything by hand."""
    h, W = torch.zeros(1, 3, requires_grad=True), torch.zeros(2, 3, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    ref, y, beta = torch.tensor([-1.0]), torch.tensor([1.0]), 0.5
    loss, q = linear_prm_loss(
        h, W, torch.tensor([1]), ref, torch.tensor([0]), y, beta=beta, bias=b, impl="chunked"
    )
    loss.backward()
    q_exp = math.log(0.5) + 1.0
    score = beta * q_exp
    assert q.item() == pytest.approx(q_exp, rel=1e-6)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-score)), rel=1e-6)
    # dL/db = (sigmoid(score) - y) * beta * (onehot(1) - p), p = (1/2, 1/2)
    gs = (1 / (1 + math.exp(-score)) - 1.0) * beta
    torch.testing.assert_close(b.grad, torch.tensor([-0.5 * gs, 0.5 * gs]))


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_global_num_seqs_accumulates_like_one_batch(impl):
    h, W, b, targets, ref, seq, labels, T = make_batch(1)
    h, W, b, targets, ref, seq, labels = to_kernel_device(impl, h, W, b, targets, ref, seq, labels)
    Wf = W.clone().requires_grad_()
    loss, _ = linear_prm_loss(h, Wf, targets, ref, seq, labels, bias=b, impl=impl)
    (g_whole,) = torch.autograd.grad(loss, Wf)
    n_present = int(seq[(seq >= 0) & (targets != -100)].unique().numel())
    cut = int((seq == 2).nonzero()[-1]) + 1  # micro-batches of whole sequences
    total, g_acc = 0.0, torch.zeros_like(W)
    for rows in (slice(0, cut), slice(cut, None)):
        Wm = W.clone().requires_grad_()
        lm, _ = linear_prm_loss(
            h[rows], Wm, targets[rows], ref[rows], seq[rows], labels, bias=b, num_seqs=n_present, impl=impl
        )
        lm.backward()
        total += float(lm.detach())
        g_acc += Wm.grad
    torch.testing.assert_close(torch.tensor(total), loss.detach().cpu(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_acc, g_whole, rtol=1e-5, atol=1e-7)


def test_chunked_fp64_gradcheck():
    h, W, b, targets, ref, seq, labels, T = make_batch(2, lengths=(1, 5, 2), D=4, V=9)
    f = lambda h_, W_, b_: linear_prm_loss(h_, W_, targets, ref, seq, labels.double(), beta=0.7, temperature=0.9,
                                          bias=b_, impl="chunked")[0]  # fmt: skip
    assert torch.autograd.gradcheck(f, [x.double().requires_grad_() for x in (h, W, b)])


def test_leading_dims_and_no_grad_into_ref():
    h, W, b, targets, ref, seq, labels, T = make_batch(3, lengths=(4, 6, 2))  # 3 x (2 + n) = 18 tokens
    ref_t = ref.float().requires_grad_()
    hb = h.reshape(2, 9, -1)
    loss, q = linear_prm_loss(
        hb, W, targets.reshape(2, 9), ref_t.reshape(2, 9), seq.reshape(2, 9), labels, impl="chunked"
    )
    assert q.shape == (2, 9)
    assert not loss.requires_grad  # nothing PRM-side requires grad, and ref_logp is a constant
    loss64, _ = fp64_prm(h, W, None, targets, ref, seq, labels, beta=0.05, T=1.0)
    assert_close(loss, loss64, "loss")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(labels=torch.tensor([0.5, 1.2])), "labels must lie in \\[0, 1\\], found 1.2"),
        (dict(labels=torch.tensor([1, 0])), "labels must be a float tensor"),
        (dict(seq_ids=torch.tensor([0, 0, 1, 2])), "seq_ids must be < S = labels.shape\\[0\\] = 2, found 2"),
        (dict(seq_ids=torch.zeros(4)), "seq_ids must be an integer"),
        (dict(ref_logp=torch.zeros(5)), "ref_logp shape"),
        (dict(beta=0.0), "beta must be"),
        (dict(num_seqs=0), "num_seqs must be positive"),
        (dict(temperature=-1.0), "temperature"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(hidden=torch.randn(4, 3), weight=torch.randn(5, 3), targets=torch.zeros(4, dtype=torch.long),
                ref_logp=torch.zeros(4), seq_ids=torch.tensor([0, 0, 1, -1]), labels=torch.tensor([0.0, 1.0]))  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        linear_prm_loss(**args)


# Structural memory: eager would hold N x V = 268M-element logits; on "meta" only shapes exist, so this is fast.
BIG = dict(n=4096, d=8, v=65536)


def prm_fwd_bwd_recorded(impl, n, d, v, device):
    leaf = lambda *shape: (
        torch.randn(*shape) if device != "meta" else torch.empty(*shape, device="meta")
    ).requires_grad_()
    hidden, weight, bias = leaf(n, d), leaf(v, d), leaf(v)
    targets = torch.zeros(n, dtype=torch.long, device=device)
    seq = (
        (torch.arange(n, device=device) // 64)
        if device != "meta"
        else torch.zeros(n, dtype=torch.long, device=device)
    )
    labels = torch.full((n // 64 + 1,), 0.5, device=device)
    with AllocationRecorder() as rec:
        loss, _ = linear_prm_loss(
            hidden, weight, targets, torch.zeros(n, device=device), seq, labels, bias=bias, impl=impl
        )
        loss.backward()
    return rec


def test_memory_recorder_sees_reference_logits():
    rec = prm_fwd_bwd_recorded("reference", **BIG, device="meta")
    assert rec.at_least(BIG["n"] * BIG["v"]), rec.describe()


def test_memory_chunked_never_allocates_tokens_x_vocab():
    rec = prm_fwd_bwd_recorded("chunked", **BIG, device="meta")
    assert not rec.at_least(BIG["n"] * BIG["v"]), rec.describe()
    assert rec.largest().numel <= 1 << 23, rec.describe()


@pytest.mark.skipif(CUDA, reason="records the interpreter's CPU allocations; test_memory.py covers CUDA")
def test_memory_triton_never_allocates_tokens_x_vocab():
    # The interpreter is slow: a small CPU shape whose backward still takes 5 vocab chunks of G [N, Vc].
    n, d, v = 64, 16, 20011
    rec = prm_fwd_bwd_recorded("triton", n, d, v, "cpu")
    assert not rec.at_least(n * v), rec.describe()
    assert rec.largest().numel <= max(v * d, n * vocab_chunk(n, v, 4)), rec.describe()


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_saved_for_backward_is_inputs_plus_per_token_state(impl):
    h, W, b, targets, ref, seq, labels, T = make_batch(5)
    n = targets.shape[0]
    h, W, b, targets, ref, seq, labels = to_kernel_device(impl, h, W, b, targets, ref, seq, labels)
    h, W = h.requires_grad_(), W.requires_grad_()
    ref32 = ref.float()
    inputs = {h.data_ptr(), W.data_ptr(), b.data_ptr(), targets.data_ptr(), seq.data_ptr(), ref32.data_ptr()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_prm_loss(h, W, targets, ref32, seq, labels, bias=b, impl=impl)
    extra = [tuple(t.shape) for t in saved if t.data_ptr() not in inputs]
    assert saved and all(t.numel() <= n for t in saved if t.data_ptr() not in inputs), f"saved: {extra}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_triton_on_cuda_matches_fp64(dtype):
    """The compiled kernels (the epilogue's segment-sum atomics included) at a larger vocab; fp64 reference on the same rounded inputs."""
    h, W, b, targets, ref, seq, labels, T = make_batch(6, lengths=(1, 300, 17, 700, 2), D=64, V=4099)
    h, W, b = (x.to(dtype) for x in (h, W, b))
    leaves = [x.detach().clone().cuda().requires_grad_() for x in (h, W, b)]
    loss, q = linear_prm_loss(leaves[0], leaves[1], targets.cuda(), ref.float().cuda(), seq.cuda(), labels.cuda(),
                              beta=0.5, temperature=0.8, bias=leaves[2], impl="triton")  # fmt: skip
    loss.backward()
    ref_leaves = [x.detach().double().requires_grad_() for x in (h, W, b)]
    loss64, q64 = fp64_prm(*ref_leaves, targets, ref, seq, labels, beta=0.5, T=0.8)
    loss64.backward()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert_close(loss.cpu(), loss64, "loss", rtol=tol, atol_scale=tol)
    assert_close(q.cpu(), q64, "q", rtol=tol, atol_scale=tol)
    for name, got, want in zip(["hidden", "weight", "bias"], leaves, ref_leaves):
        assert_close(got.grad.float().cpu(), want.grad, f"grad {name}", rtol=tol, atol_scale=tol)
