"""Triton kernels of the log-prob core: tiled h W^T with online log-sum-exp, and a backward that writes the
logit gradient per vocab chunk and leaves dh and dW to matrix multiplies. The math is in reference.py and
chunked.py (the plain-PyTorch core these kernels must equal).

Forward (one program per [BLOCK_N rows] x [one of S vocab splits], FLOPs 2NDV):
    for each BLOCK_V tile of the split: z = (sum over BLOCK_D steps of h W^T, fp32 acc + b) / T
    online over tiles, from m = -inf:  m' = max(m, max z);  s = s e^(m-m') + sum e^(z-m');
    a = e^(m-m') (a + s (m-m')) + sum e^(z-m') (z-m')  (for the entropy: a / s = sum p z - m, kept relative
    to the running max so that H = log s - a / s has no cancellation at large logits).
    Columns past V are -inf (no phantom columns). The target logit z_t = (h . W[t] + b[t]) / T is a gather-dot
    done once per row by the split-0 programs, not a compare on every logit.
    Each split writes (m, s, a) per row; the host merges the S partials with M = max m_k, w_k = e^(m_k-M):
    S = sum w_k s_k, A = sum w_k (a_k + s_k (m_k - M)), lse = M + log S, H = log S - A / S, logp = z_t - lse.
    Launch order is grouped (as in cut-cross-entropy): GROUP_N row blocks x all S splits are consecutive
    programs, so a wave reads a few row blocks of h (held in L2) and each W tile is shared by GROUP_N programs;
    S is large enough that one group fills the GPU. Row-block-major order instead re-read every row block of h
    from memory for every vocab tile (~140 GB at N=16384, D=3584, V=152064).
Backward (deterministic, no atomics), per chunk of Vc vocab rows (Vc from a fixed byte budget for G):
    a Triton kernel recomputes the chunk's logits tile by tile (2 N Vc D) and writes
        G = g (onehot - p) - e p (log p + H)      (z - sum p z = log p + H; g, e already divided by T)
    [N, Vc] in the input dtype for 16-bit inputs (fp32 statistics; fp32 for fp32 inputs), then
        dh += G W_c,   dW_c = G^T h,   db_c = sum_rows G
    are torch matmuls (cuBLAS on a GPU, fp32 accumulation). 8NDV FLOPs with the forward (2 fwd + 2 recompute
    + 2 dh + 2 dW). fp16 has 5 exponent bits: G ~ g (1 - p) with g ~ 1/tokens would be subnormal, so g and e
    are divided by one power of two s chosen so that |G| <= 1 (exact), and the products are multiplied by s.
    Peak extra memory of the backward, for N tokens, Vc = `vocab_chunk(N, V, b)` and b bytes per G element:
        N Vc b (G, <= G_BUDGET_BYTES unless N is so large that 256 columns exceed it)
        + 8 N D for 16-bit inputs (the fp32 dh accumulator and the fp32 product G W_c added to it; 0 for fp32,
          where dh is the gradient itself) + 4 Vc D for fp16 only (dW_c in fp32 before the scale) + O(N) statistics,
    i.e. O(N + chunk); never [N, V] or an fp32 [V, D].
Unmeasured on a GPU so far: configs are the usual Hopper choices compiled for sm_90 without a GPU.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRET:
    # One small config: the interpreter runs every program in numpy, so fewer, wider tiles are faster.
    _FWD_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 512, "BLOCK_D": 32})]
    _GRAD_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 512, "BLOCK_D": 32})]
    _FWD_CONFIGS_FP32, _GRAD_CONFIGS_FP32 = [], []
else:
    # Hopper configs, chosen by compiling for sm_90 without a GPU (tests/kernels/compile_sm90.py,
    # benchmarks/results/sm90_compile.md): shared memory within 227 KiB and at most a few hundred bytes of
    # register spills per thread, compiled with the launch's divisibility hints. Throughput is still untuned
    # on a real GPU: the autotuner picks among these by timing.
    _FWD_CONFIGS = [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_D": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    ]
    _GRAD_CONFIGS = [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_D": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    ]
    # fp32 tiles take twice the bytes (the 16-bit tiles above would need up to 336 KiB of shared memory) and
    # run on FMA units (ieee precision), so they are smaller.
    _FWD_CONFIGS_FP32 = [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 16}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 16}, num_warps=4, num_stages=3),
    ]
    _GRAD_CONFIGS_FP32 = [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 16}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
    ]


# FASTPRIME_AUTOTUNE=0 keeps only the first config of each kernel and dtype: for correctness runs (the GPU
# campaign's tests), where every new shape specialisation would otherwise compile and time all configs.
AUTOTUNE_ENV = "FASTPRIME_AUTOTUNE"


def _configs_for_dtype(configs, named_args, **kwargs):
    """Autotune prune: each kernel lists 16-bit and fp32 configs together; keep those of H's dtype (all of
    them when that dtype has no list of its own, as under the interpreter); only the first with
    FASTPRIME_AUTOTUNE=0."""
    fp32 = named_args["H"].dtype == torch.float32
    wanted = _FWD_CONFIGS_FP32 + _GRAD_CONFIGS_FP32 if fp32 else _FWD_CONFIGS + _GRAD_CONFIGS
    kept = [c for c in configs if any(c is w for w in wanted)] or configs
    return kept[:1] if os.environ.get(AUTOTUNE_ENV, "1") == "0" else kept


_BY_DTYPE = {"early_config_prune": _configs_for_dtype}

# Row blocks that sweep the vocabulary side by side (both kernels' launch order), and the BLOCK_N the host
# assumes when it sizes the forward's splits before autotuning picks one.
GROUP_N = 8
_HOST_BLOCK_N = 16 if INTERPRET else 128

# Bytes of one vocab chunk's logit gradient G [N, Vc] in the backward. 512 MiB on a GPU: at N=16384 tokens in
# bf16 that is Vc=16384 (10 chunks of a 152K vocab), each dh / dW product a 16384 x 16384 x D matmul that fills
# the GPU. Small under the interpreter, so that tests cross chunk boundaries.
G_BUDGET_BYTES = (1 << 20) if INTERPRET else (512 << 20)


@triton.jit
def _load_tile(PTR, idx64, idx_ok, stride, d, d_ok):
    """[len(idx64), len(d)] tile of a row-major matrix with unit stride along d; 0 outside the masks."""
    return tl.load(
        PTR + idx64[:, None] * stride + d[None, :], mask=idx_ok[:, None] & d_ok[None, :], other=0.0
    )


@triton.jit
def _grouped_tile(pid, num_n, num_v, GROUP_N: tl.constexpr):
    """Program id -> (row block, vocab block) so that GROUP_N row blocks sweep the vocab blocks together."""
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    return first_n + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _temper(x, temperature, HAS_TEMPERATURE: tl.constexpr):
    # div_rn: IEEE-rounded division, so the temperature is applied exactly as torch's z / T does; skipped at T=1.
    if HAS_TEMPERATURE:
        x = tl.div_rn(x, temperature)
    return x


@triton.jit
def _logits_tile(
    H, W, B, rows64, row_ok, cols64, col_ok, D, stride_hn, stride_wv, temperature,
    HAS_BIAS: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Tempered logits (h W^T + b) / T of a [BLOCK_N rows, BLOCK_V cols] tile, fp32 accumulation; columns
    past V hold the bias-free 0 and must be masked by the caller."""
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
    return _temper(acc, temperature, HAS_TEMPERATURE)


@triton.jit
def _target_logit(
    H, W, B, TGT, rows, rows64, row_ok, D, stride_hn, stride_wv, temperature,
    HAS_BIAS: tl.constexpr, HAS_TEMPERATURE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """z_t = (h . W[t] + b[t]) / T per row (0 where the target is -1, i.e. ignored), fp32."""
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
    tgt_ok = row_ok & (tgt >= 0)
    tgt64 = tl.where(tgt_ok, tgt, 0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        h = _load_tile(H, rows64, tgt_ok, stride_hn, d, d_ok).to(tl.float32)
        w = _load_tile(W, tgt64, tgt_ok, stride_wv, d, d_ok).to(tl.float32)
        acc += tl.sum(h * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(B + tgt64, mask=tgt_ok, other=0.0).to(tl.float32)
    return _temper(acc, temperature, HAS_TEMPERATURE)


@triton.autotune(configs=_FWD_CONFIGS + _FWD_CONFIGS_FP32, key=["V", "D"], prune_configs_by=_BY_DTYPE)
@triton.jit
def _logprobs_fwd_kernel(
    H, W, B, TGT, M_OUT, S_OUT, A_OUT, ZT_OUT,
    N, V, D, stride_hn, stride_wv, temperature, n_split,
    HAS_BIAS: tl.constexpr, NEED_ENTROPY: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n, split = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_split, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)  # offsets past 2^31 elements at large N x D or V x D
    row_ok = rows < N
    if split == 0:
        zt = _target_logit(
            H, W, B, TGT, rows, rows64, row_ok, D, stride_hn, stride_wv, temperature,
            HAS_BIAS, HAS_TEMPERATURE, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        tl.store(ZT_OUT + rows, zt, mask=row_ok)
    n_tiles = tl.cdiv(V, BLOCK_V)
    tiles_per_split = tl.cdiv(n_tiles, n_split)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    a = tl.zeros([BLOCK_N], tl.float32)
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        cols64 = cols.to(tl.int64)
        col_ok = cols < V
        z = _logits_tile(
            H, W, B, rows64, row_ok, cols64, col_ok, D, stride_hn, stride_wv, temperature,
            HAS_BIAS, HAS_TEMPERATURE, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
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
        m = m_new
    out = split * N + rows
    tl.store(M_OUT + out, m, mask=row_ok)
    tl.store(S_OUT + out, s, mask=row_ok)
    if NEED_ENTROPY:
        tl.store(A_OUT + out, a, mask=row_ok)


@triton.autotune(configs=_GRAD_CONFIGS + _GRAD_CONFIGS_FP32, key=["V", "D"], prune_configs_by=_BY_DTYPE)
@triton.jit
def _logit_grad_kernel(
    H, W, B, TGT, LSE, GL, GE, ENT, G,
    N, V, D, stride_hn, stride_wv, stride_gn, temperature,
    HAS_BIAS: tl.constexpr, HAS_GE: tl.constexpr, HAS_TEMPERATURE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """G [N, V] (of this vocab chunk) = g (onehot - p) - e p (log p + H), g and e already divided by T."""
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)  # offsets past 2^31 elements at large N x D, V x D or N x Vc
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
    grad = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if live > 0:  # row blocks without upstream gradient (e.g. prompt tokens) skip the recompute
        tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        z = _logits_tile(
            H, W, B, rows64, row_ok, cols64, col_ok, D, stride_hn, stride_wv, temperature,
            HAS_BIAS, HAS_TEMPERATURE, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        log_p = tl.where(row_ok[:, None] & col_ok[None, :], z - lse[:, None], 0.0)
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp(log_p), 0.0)
        grad = tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - g[:, None] * p
        if HAS_GE:
            grad -= e[:, None] * p * (log_p + ent[:, None])
    tl.store(
        G + rows64[:, None] * stride_gn + cols64[None, :],
        grad.to(G.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def on_device(t: Tensor):
    """Launch on t's GPU, not on whichever is current (no-op on CPU under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE fp32 dots (tf32 would cost ~1e-3 relative error in the logits)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_splits(n: int, v: int, device: torch.device) -> int:
    """Vocab splits so that one group of GROUP_N row blocks fills the SMs and all programs make about two
    waves (1 under the interpreter); at most one split per 128-column tile."""
    if INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(n, _HOST_BLOCK_N)
    wanted = max(triton.cdiv(sms, GROUP_N), triton.cdiv(2 * sms, row_blocks))
    return max(1, min(wanted, triton.cdiv(v, 128)))


def vocab_chunk(n: int, v: int, element_bytes: int, budget_bytes: int = G_BUDGET_BYTES) -> int:
    """Vocab rows per backward chunk: G [n, Vc] within budget_bytes, Vc a multiple of 256 (>= 256), <= v."""
    vc = budget_bytes // max(1, n * element_bytes) // 256 * 256
    return max(1, min(v, max(256, vc)))


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
    m, s = (torch.empty(splits, n, **f32) for _ in range(2))
    a = torch.empty(splits, n, **f32) if need_entropy else s
    zt = torch.empty(n, **f32)
    if n > 0:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,)
        with on_device(hidden):
            _logprobs_fwd_kernel[grid](
                hidden, weight, hidden if bias is None else bias, tgt, m, s, a, zt,
                n, v, dim, hidden.stride(0), weight.stride(0), float(temperature), splits,
                HAS_BIAS=bias is not None, NEED_ENTROPY=need_entropy, HAS_TEMPERATURE=temperature != 1.0,
                DOT_PRECISION=_dot_precision(hidden.dtype), GROUP_N=GROUP_N,
            )  # fmt: skip
    # Merge the per-split partials (O(splits x N)); an empty split has m = -inf, s = a = 0 and weighs 0.
    m_max = m.max(0).values
    weights = torch.exp(m - m_max)
    s_tot = (s * weights).sum(0)
    log_s = torch.log(s_tot)
    lse = m_max + log_s
    logp = torch.where(keep, zt - lse, 0.0)
    entropy = None
    if need_entropy:
        a_tot = (weights * (a + torch.where(s > 0, s * (m - m_max), 0.0))).sum(0)
        entropy = torch.where(keep, log_s - a_tot / s_tot, 0.0)
    return logp, entropy, lse


def _add_product(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """acc += a @ b with fp32 accumulation into the fp32 acc (a, b 16-bit or fp32).
    cuBLAS takes 16-bit operands with an fp32 output directly (`mm(out_dtype=)`; `addmm(out_dtype=)` would
    need acc in the operands' dtype); the CPU (interpreter tests) upcasts."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if a.is_cuda:
        return acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _fp16_scale(g: Tensor, e: Tensor | None, entropy: Tensor | None) -> Tensor:
    """A power of two s >= max |G| (0-dim): |G_ij| <= |g_i| + |e_i| max(1/e, H_i) since p (log p + H) lies in
    [-1/e, H]. Dividing g and e by s keeps G/s normal in fp16 without a host sync."""
    bound = g.abs()
    if e is not None:
        bound = bound + e.abs() * entropy.clamp(min=1 / math.e)
    top = bound.max() if bound.numel() else bound.new_zeros(())
    return torch.where(top > 0, torch.exp2(torch.ceil(torch.log2(top))), 1.0)


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
    v_chunk: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of `triton_logprobs_forward` (shapes: `logprobs_backward` in core.py), deterministic.

    Per chunk of `v_chunk` vocab rows (default `vocab_chunk`: G within G_BUDGET_BYTES) the Triton kernel
    writes the chunk's logit gradient G [N, Vc], then dh += G W_c, dW_c = G^T h, db_c = sum G are torch
    matmuls with fp32 accumulation. Peak extra memory: see the module docstring (O(N D + N Vc))."""
    hidden, weight, bias, keep, tgt = _prepare_launch(
        hidden, weight, bias, targets, ignore_index=ignore_index
    )
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy was given but entropy is None: the forward must compute entropy")
    if v_chunk is not None and v_chunk < 1:
        raise ValueError(f"v_chunk must be >= 1, got {v_chunk}")
    n, dim = hidden.shape
    v = weight.shape[0]
    need_h, need_w, need_b = needs_input_grad
    need_b = need_b and bias is not None
    # The 1/T of dz/dh is folded into the O(N) coefficients; ignored rows get g = e = 0, so a zero row of G.
    g = torch.where(keep, grad_logp.float(), 0.0) / temperature
    has_ge = grad_entropy is not None
    e = torch.where(keep, grad_entropy.float(), 0.0) / temperature if has_ge else None
    ent = entropy.float().contiguous() if has_ge else g
    scale = _fp16_scale(g, e, ent) if hidden.dtype == torch.float16 else None
    if scale is not None:
        g, e = g / scale, (None if e is None else e / scale)
    g, e = g.contiguous(), (g if e is None else e.contiguous())
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dh = torch.zeros(n, dim, **f32) if need_h else None
    grad_w = torch.empty(v, dim, dtype=weight.dtype, device=weight.device) if need_w else None
    db = torch.empty(v, **f32) if need_b else None
    if need_h or need_w or need_b:
        g_dtype = torch.float32 if hidden.dtype == torch.float32 else hidden.dtype
        vc = v_chunk or vocab_chunk(n, v, torch.finfo(g_dtype).bits // 8)
        G = torch.empty(n, min(vc, v), dtype=g_dtype, device=hidden.device)
        for v0 in range(0, v, vc):
            c = min(vc, v - v0)
            G_c, w_c = G[:, :c], weight[v0 : v0 + c]
            _launch_logit_grad(hidden, w_c, bias, v0, tgt, lse, g, e, ent, G_c, temperature, has_ge)
            if need_h:
                dh = _add_product(dh, G_c, w_c)
            if need_w and scale is None:
                torch.mm(G_c.T, hidden, out=grad_w[v0 : v0 + c])  # one rounding of an fp32 accumulation
            elif need_w:
                grad_w[v0 : v0 + c] = _add_product(torch.zeros(c, dim, **f32), G_c.T, hidden) * scale
            if need_b:
                db[v0 : v0 + c] = G_c.sum(0, dtype=torch.float32)
    if scale is not None:
        dh = None if dh is None else dh * scale
        db = None if db is None else db * scale
    return (
        None if dh is None else dh.to(hidden.dtype),
        grad_w,
        None if db is None else db.to(bias.dtype),
    )


def _launch_logit_grad(hidden, w_c, bias, v0, tgt, lse, g, e, ent, G_c, temperature, has_ge) -> None:
    """Fill G_c [N, Vc] with the logit gradient of vocab rows v0 .. v0 + Vc (w_c = weight[v0 : v0 + Vc])."""
    n, c = G_c.shape
    if n == 0:
        return
    b_c = hidden if bias is None else bias[v0 : v0 + c]
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(c, meta["BLOCK_V"]),)
    with on_device(hidden):
        _logit_grad_kernel[grid](
            hidden, w_c, b_c, tgt - v0, lse.float().contiguous(), g, e, ent, G_c,
            n, c, hidden.shape[1], hidden.stride(0), w_c.stride(0), G_c.stride(0), float(temperature),
            HAS_BIAS=bias is not None, HAS_GE=has_ge, HAS_TEMPERATURE=temperature != 1.0,
            DOT_PRECISION=_dot_precision(hidden.dtype), GROUP_N=GROUP_N,
        )  # fmt: skip
