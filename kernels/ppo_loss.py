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
The forward saves lse, g, e (and the entropy when entropy_coef != 0): O(tokens); the backward recomputes logits
tile by tile in the shared core (`LinearHeadLossFunction`).
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastprime.kernels.dispatch import check_per_token, flat_constant, flatten_head_inputs
from fastprime.kernels.linear_logprobs import LinearHeadLossFunction
from fastprime.kernels.linear_logprobs_triton import on_device
from fastprime.kernels.reference import compute_dtype, linear_logprobs_reference

LOG_RATIO_CLAMP = 20.0
CLIP_NONE, CLIP_LOW, CLIP_HIGH, CLIP_DUAL = 0, 1, 2, 3
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


@dataclass(frozen=True)
class PPOOptions:
    clip_low: float
    clip_high: float
    dual_clip: float | None
    temperature: float
    kl_coef: float
    entropy_coef: float
    ignore_index: int
    impl: str


class PPOStats(NamedTuple):
    """Detached diagnostics; scalars are 0-dim fp32 tensors averaged over the loss tokens (w != 0, not ignored)."""

    logp: Tensor  # per-token log-probs, shaped like targets (0 at ignored targets)
    clip_frac_low: Tensor  # A < 0 and ratio < 1 - clip_low: the clipped branch is active (no gradient)
    clip_frac_high: Tensor  # A > 0 and ratio > 1 + clip_high
    dual_clip_frac: Tensor  # A < 0 and the dual-clip bound -c A is active
    approx_kl: Tensor  # mean(old_logp - logp), verl's `ppo_kl`
    entropy: Tensor  # mean entropy of the tempered distribution
    ratio: Tensor  # mean ratio
    kl_ref: Tensor  # mean k3 KL to ref_logp (0 without ref_logp)


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
    term, ratio, kl, code, d, u = _ppo_terms(logp, ent, old_logp, advantages, ref_logp, valid, opts)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    adv = torch.where(valid, advantages.to(logp.dtype), zero)
    g = torch.where((code == CLIP_NONE) & (d.abs() <= LOG_RATIO_CLAMP), -adv * ratio, zero)
    if ref_logp is not None:
        eu = torch.exp(u.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        g = g + torch.where(u.abs() <= LOG_RATIO_CLAMP, opts.kl_coef * (1.0 - eu), zero)
    wv = torch.where(valid, w.to(logp.dtype), zero)
    return wv * term, wv * g, -opts.entropy_coef * wv, ratio, kl, code.to(torch.int8)


def _ppo_terms(
    logp: Tensor,
    entropy: Tensor | None,
    old_logp: Tensor,
    advantages: Tensor,
    ref_logp: Tensor | None,
    valid: Tensor,
    opts: PPOOptions,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The module docstring's per-token formula in plain torch (differentiable through logp and entropy).

    All [N] -> (term, ratio, k3 kl, clip code, d = logp - old_logp, u = ref_logp - logp), 0 at invalid tokens;
    the entropy bonus is left out when entropy is None, the KL term when ref_logp is None.
    """
    dt = logp.dtype  # fp32, or fp64 when the core ran on fp64 inputs (gradcheck)
    zero = torch.zeros((), dtype=dt, device=logp.device)
    adv = torch.where(valid, advantages.to(dt), zero)
    d = torch.where(valid, logp - old_logp.to(dt), zero)
    ratio = torch.exp(d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - opts.clip_low, 1.0 + opts.clip_high)
    pg = torch.maximum(pg1, pg2)
    code = torch.where(pg2 > pg1, torch.where(adv < 0, CLIP_LOW, CLIP_HIGH), CLIP_NONE)
    if opts.dual_clip is not None:
        pg3 = -adv * opts.dual_clip
        dual = (adv < 0) & (pg > pg3)
        pg = torch.where(dual, pg3, pg)
        code = torch.where(dual, CLIP_DUAL, code)
    term, kl, u = pg, torch.zeros_like(pg), torch.zeros_like(pg)
    if ref_logp is not None:
        u = torch.where(valid, ref_logp.to(dt) - logp, zero)
        u_c = u.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.exp(u_c) - u_c - 1.0
        term = term + opts.kl_coef * kl
    if entropy is not None:
        term = term - opts.entropy_coef * entropy
    return term, torch.where(valid, ratio, zero), kl, code, d, u


def _stats(logp, entropy, ratio, kl, code, old_logp, w, targets, ignore_index) -> PPOStats:
    loss_tok = ((targets != ignore_index) & (w != 0)).float()
    n = loss_tok.sum().clamp(min=1.0)
    mean = lambda x: (torch.where(loss_tok > 0, x.float(), 0.0)).sum() / n
    return PPOStats(
        logp=logp,
        clip_frac_low=mean(code == CLIP_LOW),
        clip_frac_high=mean(code == CLIP_HIGH),
        dual_clip_frac=mean(code == CLIP_DUAL),
        approx_kl=mean(old_logp.float() - logp),
        entropy=mean(entropy),
        ratio=mean(ratio),
        kl_ref=mean(kl),
    )


def linear_ppo_loss_reference(
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
    ignore_index: int = -100,
) -> tuple[Tensor, PPOStats]:
    """Eager fp32 specification of `linear_ppo_loss` (materialises the [N, V] logits; torch autograd).

    Shapes as in `linear_ppo_loss`, already flattened: hidden [N, D], weight [V, D], per-token tensors [N].
    """
    logp, entropy = linear_logprobs_reference(
        hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index
    )
    if old_logp is None:  # on-policy: the behaviour policy is this one, old_logp = logp without gradient
        old_logp = logp.detach()
    opts = PPOOptions(
        clip_low, clip_high, dual_clip, temperature, kl_coef, entropy_coef, ignore_index, "reference"
    )
    valid = targets != ignore_index
    term, ratio, kl, code, _, _ = _ppo_terms(logp, entropy, old_logp, advantages, ref_logp, valid, opts)
    loss = (torch.where(valid, w.to(logp.dtype), 0.0) * term).sum()
    stats = _stats(
        logp.detach(), entropy.detach(), ratio.detach(), kl.detach(), code, old_logp, w, targets, ignore_index
    )
    return loss, stats


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
    ignore_index: int = -100,
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
    opts = PPOOptions(
        clip_low, clip_high, dual_clip, float(temperature), kl_coef, entropy_coef, ignore_index, impl
    )
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

    loss, logp, entropy, ratio, kl, code = LinearHeadLossFunction.apply(
        h, weight, bias, t, opts.temperature, ignore_index, impl, True, epilogue
    )
    stats = _stats(logp, entropy, ratio, kl, code, logp if old is None else old, wf, t, ignore_index)
    return loss, stats._replace(logp=logp.reshape(shape))
