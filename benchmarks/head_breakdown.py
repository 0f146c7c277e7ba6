"""Where the fused head's forward+backward spends its time on a GPU, and how each tile config of its two Triton
kernels runs at one shape: the numbers that decide the kernels' config lists (kernels/triton_core.py).

    python benchmarks/head_breakdown.py [--n 16384 --d 3584 --v 152064] [--dtype bfloat16] [--out FILE.json]

Prints, for random inputs (never zeros):
- the whole `linear_logprobs(impl="triton")` forward and forward+backward, median ms (triton.testing.do_bench);
- the time per kernel over one forward+backward (torch.profiler), so the Triton kernels, the cuBLAS products of
  the backward and the elementwise work each get their share;
- cuBLAS alone on the backward's shapes (one vocab chunk): the logit product h W_c^T, G W_c and G^T h;
- each candidate config of the forward kernel (whole vocab) and of the logit-gradient kernel (one vocab chunk),
  launched directly, with its median ms, TFLOP/s and its largest difference from an fp32 reference (the same
  function must come out of every tiling).
On a CPU (TRITON_INTERPRET=1, small shapes, fp32/fp16) it runs the same steps with a wall-clock timer, which
checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from fastprime.kernels import linear_logprobs  # noqa: E402
from fastprime.kernels import triton_core as tc  # noqa: E402

CUDA = torch.cuda.is_available()
# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages); the first four of each are the current lists' order.
FWD_CANDIDATES = [
    (128, 128, 32, 8, 4), (64, 256, 32, 8, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 128, 8, 3),
]  # fmt: skip
GRAD_CANDIDATES = [
    (128, 128, 32, 8, 4), (128, 128, 64, 8, 3), (64, 256, 32, 8, 4), (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 32, 8, 5),
]  # fmt: skip
INTERPRET_CANDIDATES = [(16, 128, 32, 4, 1), (32, 64, 16, 4, 1)]


def bench_ms(fn) -> float:
    if CUDA:
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def whole_head(h, w, tgt) -> dict:
    hg = h.detach().requires_grad_()
    wg = w.detach().requires_grad_()
    up = torch.randn(h.shape[0], device=h.device)

    def fwd():
        with torch.no_grad():
            linear_logprobs(h, w, tgt, impl="triton")

    def fwd_bwd():
        hg.grad = wg.grad = None
        linear_logprobs(hg, wg, tgt, impl="triton").backward(up)

    out = {"fwd_ms": bench_ms(fwd), "fwd_bwd_ms": bench_ms(fwd_bwd)}
    chosen = {}
    for name in ("_logprobs_fwd_kernel", "_logit_grad_kernel"):
        best = getattr(getattr(tc, name), "best_config", None)
        chosen[name] = str(best) if best is not None else None
    out["autotuned"] = chosen
    # one profiled forward+backward, per kernel
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])
    with torch.profiler.profile(activities=acts) as prof:
        fwd_bwd()
        sync()
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us and us > 0:
            kernels.append((e.key[:90], e.count, us / 1e3))
    out["kernels_ms"] = sorted(kernels, key=lambda k: -k[2])[:15]
    return out


def cublas_shapes(h, w, vc) -> dict:
    w_c = w[:vc]
    g = torch.randn(h.shape[0], vc, device=h.device, dtype=h.dtype)
    flop = 2 * h.shape[0] * vc * h.shape[1]
    rows = {
        "h @ W_c^T (logits of a chunk)": lambda: torch.mm(h, w_c.T),
        "G @ W_c (dh part)": lambda: torch.mm(g, w_c),
        "G^T @ h (dW chunk)": lambda: torch.mm(g.T, h),
    }
    return {k: (ms := bench_ms(f), flop / ms / 1e9) for k, f in rows.items()}


def sweep(kernel, launch, candidates, flop, ref: list) -> list[dict]:
    """Each config launched directly; its outputs' largest difference from the reference outputs `ref`."""
    rows = []
    for bn, bv, bd, warps, stages in candidates:
        meta = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=warps, num_stages=stages)
        name = f"{bn}x{bv}x{bd} w{warps} s{stages}"
        try:
            outs = launch(kernel.fn, meta)
            sync()
            got = [o.float().clone() for o in outs]
            ms = bench_ms(lambda m=meta: launch(kernel.fn, m))
        except Exception as err:  # a config that does not compile or fit: reported, not fatal
            rows.append({"config": name, "error": f"{type(err).__name__}: {str(err)[:120]}"})
            continue
        diff = max(float((a - b).abs().max()) for a, b in zip(got, ref))
        rows.append({"config": name, "ms": ms, "tflops": flop / ms / 1e9, "max_diff": diff})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=16384 if CUDA else 64)
    p.add_argument("--d", type=int, default=3584 if CUDA else 64)
    p.add_argument("--v", type=int, default=152064 if CUDA else 1024)
    p.add_argument("--dtype", default="bfloat16" if CUDA else "float32")
    p.add_argument("--vc", type=int, default=16384 if CUDA else 512, help="vocab rows of the backward chunk")
    p.add_argument("--out", default=None)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: whole,cublas,fwd,grad")
    args = p.parse_args()
    skip = set(args.skip.split(","))
    torch.manual_seed(0)
    dev = "cuda" if CUDA else "cpu"
    dtype = getattr(torch, args.dtype)
    n, d, v = args.n, args.d, args.v
    h = torch.randn(n, d, device=dev).to(dtype)
    w = (torch.randn(v, d, device=dev) * d**-0.5).to(dtype)
    tgt = torch.randint(0, v, (n,), device=dev)
    report: dict = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu (interpreter)",
        "shape": vars(args),
    }
    if "whole" not in skip:
        report["whole"] = whole_head(h, w, tgt)
        print(json.dumps(report["whole"], indent=1), flush=True)
    if "cublas" not in skip and CUDA:
        report["cublas"] = cublas_shapes(h, w, args.vc)
        print(json.dumps(report["cublas"], indent=1), flush=True)
    candidates = (FWD_CANDIDATES, GRAD_CANDIDATES) if CUDA else (INTERPRET_CANDIDATES,) * 2
    dot = tc._dot_precision(dtype)
    lse_ref = _lse_chunked(h, w)
    zt_ref = (h.float() * w[tgt].float()).sum(-1)

    if "fwd" not in skip:
        splits = tc._num_splits(n, v, h.device)
        f32 = dict(dtype=torch.float32, device=dev)
        m, s, zt = (torch.empty(splits, n, **f32), torch.empty(splits, n, **f32), torch.empty(n, **f32))

        def launch_fwd(fn, meta):
            grid = (triton.cdiv(n, meta["BLOCK_N"]) * splits,)
            fn[grid](
                h, w, h, tgt, m, s, s, zt, n, v, d, h.stride(0), w.stride(0), 1.0, splits,
                HAS_BIAS=False, NEED_ENTROPY=False, HAS_TEMPERATURE=False, DOT_PRECISION=dot,
                GROUP_N=tc.GROUP_N, **meta,
            )  # fmt: skip
            # The merged log-sum-exp is the function every tiling must give (the partials depend on it).
            return [m.max(0).values + torch.log((s * torch.exp(m - m.max(0).values)).sum(0)), zt]

        report["fwd_configs"] = sweep(
            tc._logprobs_fwd_kernel, launch_fwd, candidates[0], 2 * n * v * d, ref=[lse_ref, zt_ref]
        )
        for row in report["fwd_configs"]:
            print("fwd ", row, flush=True)

    if "grad" not in skip:
        vc = min(args.vc, v)
        w_c = w[:vc]
        lse = lse_ref
        g = torch.randn(n, device=dev)
        G = torch.empty(n, vc, device=dev, dtype=dtype)

        def launch_grad(fn, meta):
            grid = (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(vc, meta["BLOCK_V"]),)
            fn[grid](
                h, w_c, h, tgt, lse, g, g, g, G, n, vc, d, h.stride(0), w_c.stride(0), G.stride(0), 1.0,
                HAS_BIAS=False, HAS_GE=False, HAS_TEMPERATURE=False, DOT_PRECISION=dot,
                GROUP_N=tc.GROUP_N, **meta,
            )  # fmt: skip
            return [G]

        # fp32 reference: G = g (onehot - softmax), the softmax over the whole vocabulary (lse_ref)
        g_ref = -g[:, None] * torch.exp(h.float() @ w_c.float().T - lse_ref[:, None])
        inside = tgt < vc
        g_ref[inside, tgt[inside]] += g[inside]
        report["grad_configs"] = sweep(
            tc._logit_grad_kernel, launch_grad, candidates[1], 2 * n * vc * d, ref=[g_ref]
        )
        for row in report["grad_configs"]:
            print("grad", row, flush=True)

    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


def _lse_chunked(h, w, chunk=16384):
    """Reference log-sum-exp of h W^T over the vocab: fp32 products (no TF32), in vocab chunks."""
    hf = h.float()
    parts = [torch.logsumexp(hf @ w[i : i + chunk].float().T, -1) for i in range(0, w.shape[0], chunk)]
    return torch.logsumexp(torch.stack(parts), 0)


if __name__ == "__main__":
    main()
