"""Clipped PPO policy loss fused onto the lm_head: hidden states -> per-token log-probs -> loss, no logits.

Per valid token t (target != ignore_index), with d = clamp(logp - old_logp, -20, 20) (verl clamps the same way so
that exp cannot overflow), ratio r = exp(d) and advantage A:
    pg_t   = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    dual clip c > 1 (Ye et al. 2020, arXiv:1912.09729; verl `compute_policy_loss`, `clip_ratio_c`):
             for A < 0, pg_t = min(pg_t, -c A), which bounds the loss when r is large for a bad action
    kl_t   = exp(u) - u - 1 with u = clamp(ref_logp - logp, -20, 20)      (k3 estimator of KL(pi || ref))
    L      = Σ_t w_t (pg_t + kl_coef kl_t) - entropy_coef Σ_t w_t H_t
Gradient coefficients (the per-token epilogue):
    g_t = dL/dlogp_t = w_t (-A r [unclipped branch active] + kl_coef (1 - exp(u)) [u not clamped])
    e_t = dL/dH_t    = -entropy_coef w_t
The forward saves lse, g, e (and the entropy when entropy_coef != 0): O(tokens); the backward recomputes the
logits one vocab chunk at a time in the shared core (`LinearHeadLossFunction`, core.py), with g and e folded into
the logit gradient. The formula in plain torch is `ppo_terms` in reference.py; this file holds its Triton twin,
the epilogue and the public function.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastprime.kernels.checks import IGNORE_INDEX, check_per_token, flat_constant, flatten_head_inputs
from fastprime.kernels.core import HeadOptions, LinearHeadLossFunction
from fastprime.kernels.reference import (
    CLIP_DUAL,
    CLIP_HIGH,
    CLIP_LOW,
    CLIP_NONE,
    LOG_RATIO_CLAMP,
    PPOOptions,
    PPOStats,
    compute_dtype,
    linear_ppo_loss_reference,
    ppo_stats,
    ppo_terms,
)
from fastprime.kernels.triton_core import on_device

# The same constants as compile-time values for the kernel (Triton only reads constexpr globals).
_CLAMP_C = tl.constexpr(LOG_RATIO_CLAMP)
_NONE_C, _LOW_C, _HIGH_C, _DUAL_C = (tl.constexpr(c) for c in (CLIP_NONE, CLIP_LOW, CLIP_HIGH, CLIP_DUAL))


@triton.jit
def _ppo_epilogue_kernel(
    logp_ptr, ent_ptr, old_ptr, adv_ptr, w_ptr, ref_ptr, tgt_ptr,
    term_ptr, g_ptr, e_ptr, ratio_ptr, kl_ptr, code_ptr,
    N, ignore_index, clip_low, clip_high, dual_clip, kl_coef, entropy_coef,
    HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_ENT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < N
    tgt = tl.load(tgt_ptr + offs, mask=in_range, other=ignore_index)
    valid = in_range & (tgt != ignore_index)
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)

    d = logp - old
    d_c = tl.minimum(tl.maximum(d, -_CLAMP_C), _CLAMP_C)
    ratio = tl.exp(d_c)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    clipped = pg2 > pg1
    pg = tl.maximum(pg1, pg2)
    code = tl.where(clipped, tl.where(adv < 0.0, _LOW_C, _HIGH_C), _NONE_C)
    if HAS_DUAL:
        pg3 = -adv * dual_clip
        dual = (adv < 0.0) & (pg > pg3)
        pg = tl.where(dual, pg3, pg)
        code = tl.where(dual, _DUAL_C, code)
    active = (code == _NONE_C) & (tl.abs(d) <= _CLAMP_C)
    g = tl.where(active, -adv * ratio, 0.0)
    term = pg
    kl = tl.zeros_like(pg)
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        u = ref - logp
        u_c = tl.minimum(tl.maximum(u, -_CLAMP_C), _CLAMP_C)
        kl = tl.exp(u_c) - u_c - 1.0
        term += kl_coef * kl
        g += tl.where(tl.abs(u) <= _CLAMP_C, kl_coef * (1.0 - tl.exp(u_c)), 0.0)
    if HAS_ENT:
        ent = tl.load(ent_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        term -= entropy_coef * ent
    tl.store(term_ptr + offs, tl.where(valid, w * term, 0.0), mask=in_range)
    tl.store(g_ptr + offs, tl.where(valid, w * g, 0.0), mask=in_range)
    tl.store(e_ptr + offs, tl.where(valid, -entropy_coef * w, 0.0), mask=in_range)
    tl.store(ratio_ptr + offs, tl.where(valid, ratio, 0.0), mask=in_range)
    tl.store(kl_ptr + offs, tl.where(valid, kl, 0.0), mask=in_range)
    tl.store(code_ptr + offs, tl.where(valid, code, _NONE_C).to(tl.int8), mask=in_range)


def ppo_epilogue(
    logp: Tensor,
    entropy: Tensor | None,
    old_logp: Tensor,
    advantages: Tensor,
    w: Tensor,
    ref_logp: Tensor | None,
    targets: Tensor,
    opts: PPOOptions,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token loss terms and gradient coefficients; all inputs [N].

    -> (w-weighted term [N], g [N], e [N], ratio [N], k3 kl [N], clip code [N] int8), zeros at ignored targets.
    """
    N = logp.shape[0]
    has_ent = entropy is not None and opts.entropy_coef != 0.0
    if impl == "triton":
        outs = [torch.empty(N, dtype=torch.float32, device=logp.device) for _ in range(5)]
        code = torch.empty(N, dtype=torch.int8, device=logp.device)
        BLOCK = 1024
        with on_device(logp):
            _ppo_epilogue_kernel[(triton.cdiv(N, BLOCK),)](
                logp, entropy if has_ent else logp, old_logp, advantages, w,
                ref_logp if ref_logp is not None else logp, targets, *outs, code,
                N, opts.ignore_index, opts.clip_low, opts.clip_high, opts.dual_clip or 0.0, opts.kl_coef,
                opts.entropy_coef, HAS_REF=ref_logp is not None, HAS_DUAL=opts.dual_clip is not None,
                HAS_ENT=has_ent, BLOCK=BLOCK,
            )  # fmt: skip
        return (*outs, code)

    valid = targets != opts.ignore_index
    ent = entropy if has_ent else None
    term, ratio, kl, code, d, u = ppo_terms(logp, ent, old_logp, advantages, ref_logp, valid, opts)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    adv = torch.where(valid, advantages.to(logp.dtype), zero)
    g = torch.where((code == CLIP_NONE) & (d.abs() <= LOG_RATIO_CLAMP), -adv * ratio, zero)
    if ref_logp is not None:
        eu = torch.exp(u.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        g = g + torch.where(u.abs() <= LOG_RATIO_CLAMP, opts.kl_coef * (1.0 - eu), zero)
    wv = torch.where(valid, w.to(logp.dtype), zero)
    return wv * term, wv * g, -opts.entropy_coef * wv, ratio, kl, code.to(torch.int8)


def _check_ppo_options(opts: PPOOptions, ref_logp: Tensor | None) -> None:
    if not 0.0 <= opts.clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {opts.clip_low}")
    if opts.clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {opts.clip_high}")
    if opts.dual_clip is not None and opts.dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {opts.dual_clip}")
    if opts.kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"kl_coef={opts.kl_coef} needs ref_logp")


def linear_ppo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    w: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    temperature: float = 1.0,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "auto",
) -> tuple[Tensor, PPOStats]:
    """Clipped PPO loss `Σ_t w_t term_t` straight from hidden states and the lm_head, without [N, V] logits.

    Args:
        hidden: [..., D] fp32/fp16/bf16 final hidden states; weight: [V, D] lm_head; bias: [V] or None.
        targets: [...] int64 sampled tokens (ignore_index: no loss, no gradient).
        old_logp, advantages, w: [...] the behaviour policy's log-probs, advantages, and aggregation weights;
            old_logp None means on-policy: the log-probs of this very forward, detached (ratio exactly 1)
            (`aggregation_weights`); ref_logp: [...] reference log-probs for the k3 KL term (needs kl_coef).
        impl: "reference" (eager, materialises logits), "chunked", "triton", or "auto" (see `resolve_impl`).
    Returns:
        loss: 0-dim fp32, differentiable w.r.t. hidden, weight, bias only;
        stats: `PPOStats` of detached tensors (no host sync).
    Equivalent to `linear_ppo_loss_reference`, i.e. `logp = log_softmax((hidden @ weight.T + bias) / T)[targets]`
    followed by the formula in this module's docstring.
    """
    shape = targets.shape
    impl, h, t = flatten_head_inputs(
        hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index, impl=impl
    )
    opts = PPOOptions(clip_low, clip_high, dual_clip, kl_coef, entropy_coef, ignore_index)
    check_per_token(targets, old_logp=old_logp, advantages=advantages, w=w, ref_logp=ref_logp)
    _check_ppo_options(opts, ref_logp)
    dt = compute_dtype(hidden.dtype)
    adv, wf = (flat_constant(x, dt) for x in (advantages, w))
    old = None if old_logp is None else flat_constant(old_logp, dt)
    ref = None if ref_logp is None else flat_constant(ref_logp, dt)
    if impl == "reference":
        loss, stats = linear_ppo_loss_reference(
            h, weight, t, old, adv, wf, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
            temperature=temperature, ref_logp=ref, kl_coef=kl_coef, entropy_coef=entropy_coef, bias=bias,
            ignore_index=ignore_index,
        )  # fmt: skip
        return loss, stats._replace(logp=stats.logp.reshape(shape))

    def epilogue(logp: Tensor, entropy: Tensor):
        # on-policy (old_logp None): old = this forward's logp (no gradient here), so ratio = 1 exactly
        behaviour = logp if old is None else old
        term, g, e, ratio, kl, code = ppo_epilogue(logp, entropy, behaviour, adv, wf, ref, t, opts, impl)
        return term.sum(), g, (e if entropy_coef != 0.0 else None), (logp, entropy, ratio, kl, code)

    head = HeadOptions(float(temperature), int(ignore_index), impl)
    loss, logp, entropy, ratio, kl, code = LinearHeadLossFunction.apply(
        h, weight, t, bias, head, True, epilogue
    )
    stats = ppo_stats(logp, entropy, ratio, kl, code, logp if old is None else old, wf, t, ignore_index)
    return loss, stats._replace(logp=logp.reshape(shape))
