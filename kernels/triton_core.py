"""Triton kernels of the log-prob core: tiled h W^T with online log-sum-exp, and the recomputing backward.

Forward (one program per [BLOCK_N rows] x [one of S vocab splits]):
    for each BLOCK_V tile of the split: z = (sum over BLOCK_D steps of h W^T, fp32 acc + b) / T
    online over tiles, from m = -inf:  m' = max(m, max z);  s = s e^(m-m') + sum e^(z-m');
    a = e^(m-m') (a + s (m-m')) + sum e^(z-m') (z-m')  (for the entropy: a / s = sum p z - m, kept relative
    to the running max so that H = log s - a / s has no cancellation at large logits);
    zt += z[target] where the target falls in the tile. Columns past V are -inf (no phantom columns).
    Each split writes (m, s, a, zt) per row; the host merges the S partials with M = max m_k, w_k = e^(m_k-M):
    S = sum w_k s_k, A = sum w_k (a_k + s_k (m_k - M)), lse = M + log S, H = log S - A / S, logp = zt - lse.
    Splitting V keeps all SMs busy when N/BLOCK_N is below ~2x SMs.
    FLOPs 2NDV.
Backward (one launch per chunk of V_CHUNK vocab rows; one program per [BLOCK_N rows] x [BLOCK_V vocab tile],
grouped order for L2 reuse):
    recompute the z tile (2 BLOCK_N BLOCK_V D), log p = z - lse, p = e^(log p),
    G = g (onehot - p) - e p (log p + H)  (z - sum p z = log p + H), divided by T;
    then per BLOCK_D step: dh[rows, d] += G W[tile, d] and dW[tile, d] += G^T h[rows, d] (fp32 atomics),
    db[tile] += sum_rows G.
    Choice: one pass with fp32 atomics, 6NDV FLOPs (2 recompute + 2 dh + 2 dW), 8NDV with the forward,
    against 10NDV for separate dh and dW passes (each must recompute the logits: D is too large to keep a
    [BLOCK_N, D] dh or [BLOCK_V, D] dW accumulator on chip). The price is N D V/BLOCK_V + V D N/BLOCK_N fp32
    atomic adds into L2 and run-to-run non-determinism of dh, dW in the last bits. Scratch memory: fp32 dh
    [N, D] and an fp32 dW [V_CHUNK, D] reused across vocab chunks (none for fp32 inputs), never [V, D] fp32. Row blocks whose upstream
    grads are all zero (e.g. fully ignored) skip their tiles. G enters the two backward dots in the input
    dtype (bf16/fp16 tensor cores), as in cut-cross-entropy and liger-kernel; accumulation stays fp32. In fp16
    each G tile is first scaled by a power of two so that small upstream grads do not go subnormal.
Unmeasured on a GPU so far: configs are the usual Hopper choices, tuned when a GPU is available.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRET:
    # One small config: the interpreter runs every program in numpy, so fewer, wider tiles are faster.
    _FWD_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 512, "BLOCK_D": 32})]
    _BWD_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 512, "BLOCK_D": 32, "GROUP_N": 4})]
    _FWD_CONFIGS_FP32, _BWD_CONFIGS_FP32 = [], []
else:
    # Hopper configs, chosen by compiling for sm_90 without a GPU (tests/kernels/compile_sm90.py,
    # benchmarks/results/sm90_compile.md): shared memory within 227 KiB and at most a few hundred bytes of
    # register spills per thread. BLOCK_D 32 leaves registers for the epilogue's tiles: 128x256x64 (fwd) and
    # 128x128x64 (bwd) spilled 1.2-1.6 KB. Throughput is still untuned on a real GPU.
    _FWD_CONFIGS = [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_D": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=4),
    ]
    _BWD_CONFIGS = [
        triton.Config(
            {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 32, "GROUP_N": 8}, num_warps=8, num_stages=3
        ),
        triton.Config(
            {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "GROUP_N": 8}, num_warps=8, num_stages=3
        ),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32, "GROUP_N": 8}, num_warps=4, num_stages=3),
    ]
    # fp32 tiles take twice the bytes (the 16-bit tiles above would need up to 336 KiB of shared memory) and
    # run on FMA units (ieee precision), so they are smaller.
    _FWD_CONFIGS_FP32 = [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 16}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 16}, num_warps=4, num_stages=3),
    ]
    _BWD_CONFIGS_FP32 = [
        triton.Config(
            {"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 16, "GROUP_N": 8}, num_warps=8, num_stages=3
        ),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32, "GROUP_N": 8}, num_warps=8, num_stages=3),
    ]


def _configs_for_dtype(configs, named_args, **kwargs):
    """Autotune prune: each kernel lists 16-bit and fp32 configs together; keep those of H's dtype (all of
    them when that dtype has no list of its own, as under the interpreter)."""
    fp32 = named_args["H"].dtype == torch.float32
    wanted = _FWD_CONFIGS_FP32 + _BWD_CONFIGS_FP32 if fp32 else _FWD_CONFIGS + _BWD_CONFIGS
    return [c for c in configs if any(c is w for w in wanted)] or configs


_BY_DTYPE = {"early_config_prune": _configs_for_dtype}


# Vocab rows of W per backward launch: bounds the fp32 dW scratch to V_CHUNK x D (117 MiB at D=3584) and
# still gives cdiv(N, 128) x 64 programs per launch at BLOCK_V=128.
V_CHUNK = 8192

# The forward partials are sized on the host before autotuning picks BLOCK_N; this is the BLOCK_N assumed.
_HOST_BLOCK_N = 16 if INTERPRET else 128


@triton.jit
def _load_tile(PTR, idx64, idx_ok, stride, d, d_ok):
    """[len(idx64), len(d)] tile of a row-major matrix with unit stride along d; 0 outside the masks."""
    return tl.load(
        PTR + idx64[:, None] * stride + d[None, :], mask=idx_ok[:, None] & d_ok[None, :], other=0.0
    )


@triton.jit
def _logits_tile(
    H, W, B, rows64, row_ok, cols64, col_ok, D, stride_hn, stride_wv, temperature,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Tempered logits (h W^T + b) / T of a [BLOCK_N rows, BLOCK_V cols] tile, fp32 accumulation; columns
    past V hold the bias-free 0 / T and must be masked by the caller."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        h = _load_tile(H, rows64, row_ok, stride_hn, d, d_ok)
        w = _load_tile(W, cols64, col_ok, stride_wv, d, d_ok)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # div_rn: IEEE-rounded division, so the temperature is applied exactly as torch's z / T does.
    return tl.div_rn(acc, temperature)


@triton.autotune(configs=_FWD_CONFIGS + _FWD_CONFIGS_FP32, key=["V", "D"], prune_configs_by=_BY_DTYPE)
@triton.jit
def _logprobs_fwd_kernel(
    H, W, B, TGT, M_OUT, S_OUT, A_OUT, ZT_OUT,
    N, V, D, stride_hn, stride_wv, temperature, n_split,
    HAS_BIAS: tl.constexpr, NEED_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)  # offsets past 2^31 elements at large N x D or V x D
    row_ok = rows < N
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
    n_tiles = tl.cdiv(V, BLOCK_V)
    tiles_per_split = tl.cdiv(n_tiles, n_split)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    a = tl.zeros([BLOCK_N], tl.float32)
    zt = tl.zeros([BLOCK_N], tl.float32)
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        cols64 = cols.to(tl.int64)
        col_ok = cols < V
        z = _logits_tile(
            H, W, B, rows64, row_ok, cols64, col_ok, D, stride_hn, stride_wv, temperature,
            HAS_BIAS, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        scale = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        if NEED_ENTROPY:
            # The first tile has s = 0 and m = -inf: skip s (m - m') there instead of forming 0 * -inf.
            shift = s * tl.where(s > 0, m - m_new, 0.0)
            z_rel = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)  # 0, not -inf, on phantom columns
            a = scale * (a + shift) + tl.sum(p * z_rel, axis=1)
        s = s * scale + tl.sum(p, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    out = split * N + rows
    tl.store(M_OUT + out, m, mask=row_ok)
    tl.store(S_OUT + out, s, mask=row_ok)
    tl.store(ZT_OUT + out, zt, mask=row_ok)
    if NEED_ENTROPY:
        tl.store(A_OUT + out, a, mask=row_ok)


# DH accumulates across the vocab-chunk launches, so autotuning must restore it, not zero it.
@triton.autotune(
    configs=_BWD_CONFIGS + _BWD_CONFIGS_FP32,
    key=["V", "D"],
    prune_configs_by=_BY_DTYPE,
    reset_to_zero=["DW", "DB"],
    restore_value=["DH"],
)
@triton.jit
def _logprobs_bwd_kernel(
    H, W, B, TGT, LSE, GL, GE, ENT, DH, DW, DB,
    N, V, D, stride_hn, stride_wv, temperature,
    HAS_BIAS: tl.constexpr, HAS_GE: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):  # fmt: skip
    # Grouped ordering: GROUP_N row blocks sweep the vocab tiles together, so W tiles are reused from L2.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)  # offsets past 2^31 elements at large N x D or V x D
    row_ok = rows < N
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols64 = cols.to(tl.int64)
    col_ok = cols < V
    g = tl.load(GL + rows, mask=row_ok, other=0.0)
    live = tl.max(tl.abs(g), axis=0)
    if HAS_GE:
        e = tl.load(GE + rows, mask=row_ok, other=0.0)
        ent = tl.load(ENT + rows, mask=row_ok, other=0.0)
        live += tl.max(tl.abs(e), axis=0)
    if live > 0:
        tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        z = _logits_tile(
            H, W, B, rows64, row_ok, cols64, col_ok, D, stride_hn, stride_wv, temperature,
            HAS_BIAS, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        log_p = tl.where(row_ok[:, None] & col_ok[None, :], z - lse[:, None], 0.0)
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp(log_p), 0.0)
        G = tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - g[:, None] * p
        if HAS_GE:
            G -= e[:, None] * p * (log_p + ent[:, None])
        G = tl.div_rn(G, temperature)
        if NEED_DB:
            tl.atomic_add(DB + cols, tl.sum(G, axis=0), mask=col_ok)
        # fp16 has 5 exponent bits: G ~ g (1 - p) with g ~ 1/tokens is subnormal there and would keep ~7 bits.
        # Scale the tile by a power of two (exact) so its largest entry is ~1, and undo it on the fp32 products.
        g_scale = 1.0
        if H.dtype.element_ty == tl.float16:
            g_max = tl.max(tl.max(tl.abs(G), axis=1), axis=0)
            g_scale = tl.where(g_max > 0, tl.exp2(tl.ceil(tl.log2(g_max))), 1.0)
            G = G / g_scale
        G_in = G.to(H.dtype.element_ty)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_ok = d < D
            if NEED_DH:
                w = _load_tile(W, cols64, col_ok, stride_wv, d, d_ok)
                dh = tl.dot(G_in, w, input_precision=DOT_PRECISION) * g_scale
                tl.atomic_add(DH + rows64[:, None] * D + d[None, :], dh, mask=row_ok[:, None] & d_ok[None, :])
            if NEED_DW:
                h = _load_tile(H, rows64, row_ok, stride_hn, d, d_ok)
                dw = tl.dot(tl.trans(G_in), h, input_precision=DOT_PRECISION) * g_scale
                tl.atomic_add(DW + cols64[:, None] * D + d[None, :], dw, mask=col_ok[:, None] & d_ok[None, :])


def on_device(t: Tensor):
    """Launch on t's GPU, not on whichever is current (no-op on CPU under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE fp32 dots (tf32 would cost ~1e-3 relative error in the logits)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_splits(n: int, v: int, device: torch.device) -> int:
    """Vocab splits so that row blocks x splits fill about two waves of SMs (1 under the interpreter)."""
    if INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(n, _HOST_BLOCK_N)
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(v, 128)))


def _prepare_launch(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """Checks and layouts both launchers share: hidden [N, D], weight [V, D], bias [V] or None, targets [N]
    -> (hidden and weight with unit stride along D, bias contiguous (the kernels index it by column),
    keep [N] bool, targets [N] contiguous with -1 at ignored rows)."""
    if hidden.dtype == torch.float64:
        raise ValueError("impl='triton' does not take float64 inputs; use impl='chunked' or 'reference'")
    if INTERPRET and hidden.dtype == torch.bfloat16:
        # The interpreter's tl.dot on bf16 returns garbage (~1e10 errors in triton 3.x): refuse, do not mislead.
        raise ValueError(
            "impl='triton' under TRITON_INTERPRET=1 does not take bfloat16 (the interpreter's bf16 dot is "
            "broken); use float16/float32 or impl='chunked'"
        )
    if not (hidden.is_cuda or INTERPRET):
        raise ValueError(
            f"impl='triton' needs a CUDA tensor or TRITON_INTERPRET=1, got device {hidden.device}; "
            "use impl='chunked'"
        )
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    keep = targets != ignore_index
    return hidden, weight, bias, keep, torch.where(keep, targets, -1).contiguous()


def triton_logprobs_forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    need_entropy: bool,
    n_split: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """hidden [N, D], weight [V, D], targets [N], bias [V] or None -> (logp [N], entropy [N] or None, lse [N]),
    fp32; ignored rows give logp = entropy = 0. n_split overrides the number of vocab splits (tests)."""
    hidden, weight, bias, keep, tgt = _prepare_launch(
        hidden, weight, bias, targets, ignore_index=ignore_index
    )
    n, dim = hidden.shape
    v = weight.shape[0]
    splits = n_split or _num_splits(n, v, hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m, s, zt = (torch.empty(splits, n, **f32) for _ in range(3))
    a = torch.empty(splits, n, **f32) if need_entropy else s
    if n > 0:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)
        with on_device(hidden):
            _logprobs_fwd_kernel[grid](
                hidden, weight, hidden if bias is None else bias, tgt, m, s, a, zt,
                n, v, dim, hidden.stride(0), weight.stride(0), float(temperature), splits,
                HAS_BIAS=bias is not None, NEED_ENTROPY=need_entropy, DOT_PRECISION=_dot_precision(hidden.dtype),
            )  # fmt: skip
    # Merge the per-split partials (O(splits x N)); an empty split has m = -inf, s = a = 0 and weighs 0.
    m_max = m.max(0).values
    weights = torch.exp(m - m_max)
    s_tot = (s * weights).sum(0)
    log_s = torch.log(s_tot)
    lse = m_max + log_s
    logp = torch.where(keep, zt.sum(0) - lse, 0.0)
    entropy = None
    if need_entropy:
        a_tot = (weights * (a + torch.where(s > 0, s * (m - m_max), 0.0))).sum(0)
        entropy = torch.where(keep, log_s - a_tot / s_tot, 0.0)
    return logp, entropy, lse


def triton_logprobs_backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    needs_input_grad: tuple[bool, bool, bool],
    v_chunk: int = V_CHUNK,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of `triton_logprobs_forward`: see `logprobs_backward` in core.py for shapes.

    dh accumulates in fp32 [N, D] (the gradient itself when hidden is fp32); the vocab is processed in
    chunks of `v_chunk` rows of W, each with an fp32 [v_chunk, D] dW accumulator copied into grad_weight
    afterwards (none when weight is fp32), so the scratch stays O(N D + v_chunk D), never O(V D) or O(N V)."""
    hidden, weight, bias, keep, tgt = _prepare_launch(
        hidden, weight, bias, targets, ignore_index=ignore_index
    )
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy was given but entropy is None: the forward must compute entropy")
    if v_chunk < 1:
        raise ValueError(f"v_chunk must be >= 1, got {v_chunk}")
    n, dim = hidden.shape
    v = weight.shape[0]
    need_h, need_w, need_b = needs_input_grad
    need_b = need_b and bias is not None
    g = torch.where(keep, grad_logp.float(), 0.0).contiguous()
    has_ge = grad_entropy is not None
    e = torch.where(keep, grad_entropy.float(), 0.0).contiguous() if has_ge else g
    ent = entropy.float().contiguous() if has_ge else g
    lse = lse.float().contiguous()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    # Outputs that are not needed get their own dummy, never an input: autotuning zeroes DW and DB
    # (reset_to_zero) before every timed run and before the real launch.
    unused = torch.zeros(1, **f32)
    dh = torch.zeros(n, dim, **f32) if need_h else unused
    grad_w = torch.zeros(v, dim, dtype=weight.dtype, device=weight.device) if need_w else None
    dw_scratch = None
    if need_w and weight.dtype != torch.float32:
        dw_scratch = torch.empty(min(v, v_chunk), dim, **f32)
    db = torch.zeros(v, **f32) if need_b else unused
    if n > 0 and (need_h or need_w or need_b):
        for v0 in range(0, v, v_chunk):
            vc = min(v_chunk, v - v0)
            dw = unused
            if need_w:
                dw = grad_w[v0 : v0 + vc] if dw_scratch is None else dw_scratch[:vc].zero_()
            grid = lambda meta, vc=vc: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(vc, meta["BLOCK_V"]),)
            with on_device(hidden):
                _logprobs_bwd_kernel[grid](
                    hidden, weight[v0 : v0 + vc], hidden if bias is None else bias[v0 : v0 + vc], tgt - v0,
                    lse, g, e, ent, dh, dw, db[v0 : v0 + vc] if need_b else db,
                    n, vc, dim, hidden.stride(0), weight.stride(0), float(temperature),
                    HAS_BIAS=bias is not None, HAS_GE=has_ge, NEED_DH=need_h, NEED_DW=need_w, NEED_DB=need_b,
                    DOT_PRECISION=_dot_precision(hidden.dtype),
                )  # fmt: skip
            if dw_scratch is not None:
                grad_w[v0 : v0 + vc].copy_(dw)
    return (
        dh.to(hidden.dtype) if need_h else None,
        grad_w,
        db.to(bias.dtype) if need_b else None,
    )
