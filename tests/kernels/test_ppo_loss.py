"""linear_ppo_loss against an fp64 eager reference written here: loss, stats and gradients for hidden, weight, bias."""

import math

import pytest
import torch
from devices import CUDA, kernel_device, to_kernel_device
from memory_probe import AllocationRecorder

from fastprime.kernels import aggregation_weights, linear_ppo_loss
from fastprime.kernels.ppo_loss import PPOOptions, ppo_epilogue
from fastprime.kernels.triton_core import vocab_chunk

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
IMPLS = ["chunked", "triton"]
# Log-ratios logp - old_logp placed away from the clip boundaries log(0.8), log(1.2) and log(dual 1.5):
# 0.61 (low side), 0.90, 1.05, 1.11 (inside), 1.82 (high side, and above the dual-clip bound 1.5).
LOG_RATIOS = torch.tensor([-0.5, -0.1, 0.05, 0.1, 0.6], dtype=torch.float64)


def fp64_ppo(
    h, W, b, targets, old, adv, w, ref, *, clip_low, clip_high, dual_clip, T, kl_coef, ent_coef, ignore=-100
):
    """The textbook formula in fp64: -min(rA, clip(r)A), dual clip min(., -cA) for A < 0, k3 KL, entropy."""
    z = (h.double() @ W.double().T + (0 if b is None else b.double())) / T
    logprobs = torch.log_softmax(z, -1)
    valid = targets != ignore
    logp = logprobs.gather(-1, targets.clamp(min=0)[:, None])[:, 0] * valid
    ent = -(logprobs.exp() * logprobs).sum(-1) * valid
    r = torch.exp(logp - old)
    term = -torch.minimum(r * adv, r.clamp(1 - clip_low, 1 + clip_high) * adv)
    if dual_clip is not None:
        term = torch.where(adv < 0, torch.minimum(term, -dual_clip * adv), term)
    if ref is not None:
        term = term + kl_coef * (torch.exp(ref - logp) - (ref - logp) - 1)
    term = term - ent_coef * ent
    return (w * term * valid).sum(), logp, ent, r


def make_batch(seed, *, lengths=(1, 9, 3, 17, 2), D=16, V=37, bias=True, ignore_frac=0.15, T=1.0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])
    N = seq.shape[0]
    h = torch.randn(N, D, generator=g) * 0.7
    W = torch.randn(V, D, generator=g) * 0.5
    b = torch.randn(V, generator=g) * 0.3 if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignore_frac] = -100
    targets[0] = 5  # the length-1 sequence is valid
    mask = (torch.rand(N, generator=g) > 0.1).long()
    mask[0] = 1
    with torch.no_grad():
        _, logp, _, _ = fp64_ppo(h, W, b, targets, torch.zeros(N), torch.zeros(N), torch.zeros(N), None,
                                 clip_low=0.2, clip_high=0.2, dual_clip=None, T=T, kl_coef=0, ent_coef=0)  # fmt: skip
    old = logp - LOG_RATIOS[torch.arange(N) % len(LOG_RATIOS)]
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    adv = torch.where(
        torch.arange(N) % 2 == 0, adv.abs() + 0.1, -adv.abs() - 0.1
    )  # both signs at every ratio
    adv = adv[torch.randperm(N, generator=g)]
    ref = logp + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    return h, W, b, targets, seq, mask, old, adv, ref


CONFIGS = {
    "plain": dict(),
    "dual": dict(dual_clip=1.5),
    "kl": dict(kl_coef=0.1),
    "entropy": dict(entropy_coef=0.05),
    "all_T0.7": dict(dual_clip=1.5, kl_coef=0.2, entropy_coef=0.01, temperature=0.7, clip_high=0.28),
}


def run_case(impl, mode, cfg, *, bias=True, seed=0, dtype=torch.float32):
    T = cfg.get("temperature", 1.0)
    h, W, b, targets, seq, mask, old, adv, ref = make_batch(seed, bias=bias, T=T)
    w = aggregation_weights(mask, seq, mode=mode).double()
    use_ref = cfg.get("kl_coef", 0.0) != 0.0
    dev = kernel_device(impl)
    ht, Wt = h.to(dev, dtype).clone().requires_grad_(), W.to(dev, dtype).clone().requires_grad_()
    bt = b.to(dev, dtype).clone().requires_grad_() if b is not None else None
    k_targets, k_old, k_adv, k_w, k_ref = to_kernel_device(impl, targets, old.float(), adv.float(), w.float(),
                                                           ref.float() if use_ref else None)  # fmt: skip
    loss, stats = linear_ppo_loss(
        ht, Wt, k_targets, k_old, k_adv, k_w, bias=bt, ref_logp=k_ref, impl=impl, **cfg
    )
    loss.backward()

    h64, W64 = h.double().requires_grad_(), W.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    loss64, logp64, ent64, r64 = fp64_ppo(
        h64, W64, b64, targets, old, adv, w, ref if use_ref else None, clip_low=cfg.get("clip_low", 0.2),
        clip_high=cfg.get("clip_high", 0.2), dual_clip=cfg.get("dual_clip"), T=T,
        kl_coef=cfg.get("kl_coef", 0.0), ent_coef=cfg.get("entropy_coef", 0.0),
    )  # fmt: skip
    loss64.backward()
    return (
        (loss, stats, ht, Wt, bt),
        (loss64, logp64, ent64, r64, h64, W64, b64),
        (targets, mask, seq, adv, w),
    )


def assert_close(actual, expected, what, rtol=2e-5, atol_scale=2e-5):
    atol = atol_scale * float(expected.detach().abs().max().clamp(min=1e-3))
    torch.testing.assert_close(
        actual.double().cpu(), expected.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=list(CONFIGS))
def test_loss_stats_and_grads_match_fp64(impl, mode, cfg):
    (loss, stats, ht, Wt, bt), (loss64, logp64, ent64, r64, h64, W64, b64), (targets, mask, seq, adv, w) = (
        run_case(impl, mode, CONFIGS[cfg])
    )
    assert_close(loss, loss64, "loss")
    assert_close(stats.logp, logp64, "logp")
    assert_close(ht.grad, h64.grad, "grad hidden")
    assert_close(Wt.grad, W64.grad, "grad weight")
    assert_close(bt.grad, b64.grad, "grad bias")
    # stats: plain means over the loss tokens (target kept and w != 0)
    sel = (targets != -100) & (w != 0)
    lo, hi = CONFIGS[cfg].get("clip_low", 0.2), CONFIGS[cfg].get("clip_high", 0.2)
    dual = CONFIGS[cfg].get("dual_clip")
    is_dual = (adv < 0) & (r64 > dual) if dual is not None else torch.zeros_like(sel)
    expected = {
        "clip_frac_low": ((adv < 0) & (r64 < 1 - lo) & ~is_dual)[sel].double().mean(),
        "clip_frac_high": ((adv > 0) & (r64 > 1 + hi))[sel].double().mean(),
        "dual_clip_frac": is_dual[sel].double().mean(),
        "ratio": r64[sel].mean(),
        "entropy": ent64[sel].mean(),
        "approx_kl": (-torch.log(r64))[sel].mean(),
    }
    for name, value in expected.items():
        assert getattr(stats, name).shape == ()
        assert_close(getattr(stats, name), value, f"stats.{name}")
    # the batch really exercises both clip sides (and the dual clip where on)
    assert stats.clip_frac_low > 0 and stats.clip_frac_high > 0
    assert dual is None or stats.dual_clip_frac > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_no_bias_fp16_hidden(impl):
    (loss, stats, ht, Wt, bt), (loss64, _, _, _, h64, W64, _), _ = run_case(
        impl, "token-mean", CONFIGS["kl"], bias=False, dtype=torch.float16
    )
    assert bt is None and ht.grad.dtype == torch.float16 and Wt.grad.dtype == torch.float16
    # fp16 inputs are rounded before the fp32 kernel: compare with the fp64 loss of the same rounded inputs loosely
    assert_close(loss, loss64, "loss", rtol=2e-2, atol_scale=2e-2)
    assert_close(ht.grad.float(), h64.grad, "grad hidden", rtol=2e-2, atol_scale=2e-2)
    assert_close(Wt.grad.float(), W64.grad, "grad weight", rtol=2e-2, atol_scale=2e-2)


def test_chunked_fp64_gradcheck():
    h, W, b, targets, seq, mask, old, adv, ref = make_batch(1, lengths=(1, 4, 2), D=5, V=11)
    w = aggregation_weights(mask, seq, mode="seq-mean-token-mean").double()
    f = lambda h_, W_, b_: linear_ppo_loss(h_, W_, targets, old, adv, w, bias=b_, ref_logp=ref, kl_coef=0.1,
                                          entropy_coef=0.05, dual_clip=1.5, temperature=0.8, impl="chunked")[0]  # fmt: skip
    args = [x.double().requires_grad_() for x in (h, W, b)]
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_leading_batch_dims_and_ignored_rows(impl):
    h, W, b, targets, seq, mask, old, adv, ref = make_batch(2, lengths=(8, 8, 8))
    targets[8:16] = -100  # a whole row ignored
    w = aggregation_weights(mask.reshape(3, 8), mode="seq-mean-token-sum").reshape(-1)
    hb = h.reshape(3, 8, -1).requires_grad_()
    loss, stats = linear_ppo_loss(hb, W, targets.reshape(3, 8), old.float().reshape(3, 8), adv.float().reshape(3, 8),
                                  w.reshape(3, 8), bias=b, impl=impl)  # fmt: skip
    loss.backward()
    assert stats.logp.shape == (3, 8) and torch.all(stats.logp[1] == 0)
    assert torch.all(hb.grad[1] == 0)
    loss64, logp64, *_ = fp64_ppo(h, W, b, targets, old, adv, w.double(), None, clip_low=0.2, clip_high=0.2,
                                  dual_clip=None, T=1.0, kl_coef=0.0, ent_coef=0.0)  # fmt: skip
    assert_close(loss, loss64, "loss")


@pytest.mark.parametrize("mode", MODES)
def test_microbatch_accumulation_matches_whole_batch(mode):
    h, W, b, targets, seq, mask, old, adv, ref = make_batch(3, lengths=(1, 9, 3, 17, 2))
    kw = dict(bias=None, dual_clip=2.0, impl="chunked")
    Wf = W.clone().requires_grad_()
    loss, _ = linear_ppo_loss(
        h, Wf, targets, old.float(), adv.float(), aggregation_weights(mask, seq, mode=mode), **kw
    )
    (g_whole,) = torch.autograd.grad(loss, Wf)
    valid = (mask != 0) & (seq >= 0)
    norm = (
        dict(num_tokens=int(valid.sum()))
        if mode == "token-mean"
        else dict(num_seqs=int(seq[valid].unique().numel()))
    )
    g_acc = torch.zeros_like(W)
    total = 0.0
    for a, z in [(0, 10), (10, 30), (30, 32)]:  # whole sequences: [s0 s1], [s2 s3], [s4]
        w = aggregation_weights(mask[a:z], seq[a:z], mode=mode, **norm)
        Wm = W.clone().requires_grad_()
        lm, _ = linear_ppo_loss(h[a:z], Wm, targets[a:z], old[a:z].float(), adv[a:z].float(), w, **kw)
        lm.backward()
        g_acc += Wm.grad
        total += float(lm.detach())
    torch.testing.assert_close(torch.tensor(total), loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_acc, g_whole, rtol=1e-5, atol=1e-7)


def test_triton_epilogue_matches_torch_epilogue():
    """The Triton per-token epilogue alone (native on CUDA, else the interpreter on CPU) against the torch one,
    on extreme ratios too."""
    g = torch.Generator().manual_seed(4)
    N = 300
    logp = -torch.rand(N, generator=g) * 5
    old = logp - torch.randn(N, generator=g) * 0.5
    old[:10] = logp[:10] + 30  # log-ratio beyond the clamp
    adv, w = torch.randn(N, generator=g), torch.rand(N, generator=g)
    ref = logp + torch.randn(N, generator=g)
    ref[10:20] = logp[10:20] + 25  # k3 exponent beyond the clamp
    ent = torch.rand(N, generator=g) * 3
    targets = torch.randint(0, 7, (N,), generator=g)
    targets[::7] = -100
    logp, ent, old, adv, w, ref, targets = to_kernel_device("triton", logp, ent, old, adv, w, ref, targets)
    opts = PPOOptions(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01)
    got = ppo_epilogue(logp, ent, old, adv, w, ref, targets, opts, "triton")
    want = ppo_epilogue(logp, ent, old, adv, w, ref, targets, opts, "chunked")
    for name, a, b in zip(["term", "g", "e", "ratio", "kl", "code"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert torch.isfinite(got[0]).all()
    # clamped log-ratio: no PPO gradient; clamped k3 exponent: no KL gradient
    opts_pg = PPOOptions(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    g_pg = ppo_epilogue(logp, ent, old, adv, w, None, targets, opts_pg, "triton")[1]
    assert torch.all(g_pg[:10] == 0)
    torch.testing.assert_close(got[1][10:20], g_pg[10:20])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clip_low=1.0), "clip_low must be in"),
        (dict(clip_high=-0.1), "clip_high must be >= 0"),
        (dict(dual_clip=1.0), "dual_clip must be > 1"),
        (dict(kl_coef=0.1), "kl_coef=0.1 needs ref_logp"),
        (dict(temperature=0.0), "temperature"),
        (dict(impl="fast"), "impl='fast'"),
        (dict(old_logp=torch.zeros(3)), "old_logp shape"),
        (dict(w=torch.zeros(4, 1)), "w shape"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(hidden=torch.randn(4, 3), weight=torch.randn(5, 3), targets=torch.zeros(4, dtype=torch.long),
                old_logp=torch.zeros(4), advantages=torch.zeros(4), w=torch.ones(4))  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        linear_ppo_loss(**args)


# Structural memory: eager would hold N x V = 268M-element logits; on "meta" only shapes exist, so this is fast.
BIG = dict(n=4096, d=8, v=65536)


def ppo_fwd_bwd_recorded(impl, n, d, v, device):
    leaf = lambda *shape: (
        torch.randn(*shape) if device != "meta" else torch.empty(*shape, device="meta")
    ).requires_grad_()
    hidden, weight, bias = leaf(n, d), leaf(v, d), leaf(v)
    per_tok = lambda: torch.zeros(n, device=device)
    targets = torch.zeros(n, dtype=torch.long, device=device)
    with AllocationRecorder() as rec:
        loss, _ = linear_ppo_loss(hidden, weight, targets, per_tok(), per_tok() + 1, per_tok() + 1 / n, bias=bias,
                                  ref_logp=per_tok(), kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0, impl=impl)  # fmt: skip
        loss.backward()
    return rec


def test_memory_recorder_sees_reference_logits():
    rec = ppo_fwd_bwd_recorded("reference", **BIG, device="meta")
    assert rec.at_least(BIG["n"] * BIG["v"]), rec.describe()


def test_memory_chunked_never_allocates_tokens_x_vocab():
    rec = ppo_fwd_bwd_recorded("chunked", **BIG, device="meta")
    assert not rec.at_least(BIG["n"] * BIG["v"]), rec.describe()
    assert rec.largest().numel <= 1 << 23, rec.describe()  # one chunk of logits at most


@pytest.mark.skipif(CUDA, reason="records the interpreter's CPU allocations; test_memory.py covers CUDA")
def test_memory_triton_never_allocates_tokens_x_vocab():
    # The interpreter is slow: a small CPU shape whose backward still takes 5 vocab chunks of G [N, Vc].
    n, d, v = 64, 16, 20011
    rec = ppo_fwd_bwd_recorded("triton", n, d, v, "cpu")
    assert not rec.at_least(n * v), rec.describe()
    assert rec.largest().numel <= max(v * d, n * vocab_chunk(n, v, 4)), rec.describe()


@pytest.mark.parametrize("impl", IMPLS)
def test_saved_for_backward_is_inputs_plus_per_token_state(impl):
    h, W, b, targets, seq, mask, old, adv, ref = make_batch(5)
    n = targets.shape[0]
    h, W, b, targets, old, adv, w, ref = to_kernel_device(
        impl, h, W, b, targets, old.float(), adv.float(), torch.full((n,), 0.1), ref.float()
    )
    h, W = h.requires_grad_(), W.requires_grad_()
    inputs = {h.data_ptr(), W.data_ptr(), b.data_ptr(), targets.data_ptr()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_ppo_loss(h, W, targets, old, adv, w, bias=b, ref_logp=ref,
                        kl_coef=0.1, entropy_coef=0.01, impl=impl)  # fmt: skip
    extra = [tuple(t.shape) for t in saved if t.data_ptr() not in inputs]
    assert saved and all(t.numel() <= n for t in saved if t.data_ptr() not in inputs), f"saved: {extra}"


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_two_word_vocab(impl):
    """Zero logits over 2 words: logp = log 1/2 for both tokens; old_logp puts the ratio at 1.5.
    Token 0 (A = +1): clipped high, loss -1.2, no gradient. Token 1 (A = -1): unclipped, loss +1.5, g = 1.5;
    with dual clip c = 1.4 it is capped at 1.4 with no gradient."""
    dev = kernel_device(impl)
    h = torch.zeros(2, 3, device=dev)
    W = torch.zeros(2, 3, device=dev)
    targets = torch.tensor([0, 1], device=dev)
    old = torch.full((2,), math.log(0.5) - math.log(1.5), device=dev)
    adv, w = torch.tensor([1.0, -1.0], device=dev), torch.ones(2, device=dev)
    for dual, loss_exp, gb_exp in [(None, -1.2 + 1.5, [-0.75, 0.75]), (1.4, -1.2 + 1.4, [0.0, 0.0])]:
        b = torch.zeros(2, requires_grad=True, device=dev)
        loss, stats = linear_ppo_loss(h, W, targets, old, adv, w, bias=b, dual_clip=dual, impl=impl)
        loss.backward()
        assert loss.item() == pytest.approx(loss_exp, rel=1e-6)
        # dL/db = Σ_t g_t (onehot(t) - p), p = (1/2, 1/2); only token 1 has g = -A r = 1.5
        torch.testing.assert_close(b.grad.cpu(), torch.tensor(gb_exp))
        assert stats.clip_frac_high.item() == 0.5 and stats.ratio.item() == pytest.approx(1.5)
        assert stats.dual_clip_frac.item() == (0.5 if dual else 0.0)
        assert stats.entropy.item() == pytest.approx(math.log(2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_triton_on_cuda_matches_fp64(dtype):
    """The compiled kernels (not the interpreter) at a larger vocab; the fp64 reference sees the same rounded inputs."""
    h, W, b, targets, seq, mask, old, adv, ref = make_batch(6, lengths=(1, 300, 17, 700, 2), D=64, V=4099)
    h, W, b = (x.to(dtype) for x in (h, W, b))
    w = aggregation_weights(mask, seq, mode="seq-mean-token-mean").double()
    cfg = CONFIGS["all_T0.7"]
    leaves = [x.detach().clone().cuda().requires_grad_() for x in (h, W, b)]
    loss, stats = linear_ppo_loss(leaves[0], leaves[1], targets.cuda(), old.float().cuda(), adv.float().cuda(),
                                  w.float().cuda(), bias=leaves[2], ref_logp=ref.float().cuda(), impl="triton", **cfg)  # fmt: skip
    loss.backward()
    ref_leaves = [x.detach().double().requires_grad_() for x in (h, W, b)]
    loss64, logp64, *_ = fp64_ppo(*ref_leaves, targets, old, adv, w, ref, clip_low=0.2, clip_high=cfg["clip_high"],
                                  dual_clip=cfg["dual_clip"], T=cfg["temperature"], kl_coef=cfg["kl_coef"],
                                  ent_coef=cfg["entropy_coef"])  # fmt: skip
    loss64.backward()
    tol = 2e-5 if dtype == torch.float32 else 2e-2  # bf16 gradients are rounded on output
    assert_close(loss.cpu(), loss64, "loss", rtol=tol, atol_scale=tol)
    assert_close(stats.logp.cpu(), logp64, "logp", rtol=tol, atol_scale=tol)
    for name, got, want in zip(["hidden", "weight", "bias"], leaves, ref_leaves):
        assert_close(got.grad.float().cpu(), want.grad, f"grad {name}", rtol=tol, atol_scale=tol)
