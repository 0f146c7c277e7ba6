"""The log-prob core in plain PyTorch, one chunk of rows at a time: the CPU default and the fallback wherever
Triton cannot run. Equals `linear_logprobs_reference` (reference.py), the math is written there.

Backward, with g = dL/dlogp_t and e = dL/dH per row:
    G = g (onehot(target) - p) - e p (z - sum_j p_j z_j)
    dh = G W / T      dW = G^T h / T      db = sum_rows G / T
`chunked_logprobs_forward` / `chunked_logprobs_backward` never hold more than one chunk of rows x V logits
(the chunk is sized by an element budget) and save only O(N) state between the two. For bf16/fp16 inputs
they also hold an fp32 copy of W and an fp32 dW accumulator, O(V D) each; the Triton path needs neither.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastprime.kernels.reference import compute_dtype

# Elements of one logits chunk (rows x V) in the chunked path; a few such temporaries live at once.
# CPU: 2^23 fp32 = 32 MiB, small enough for any machine, large enough for efficient matmuls.
# CUDA: 2^26 = 256 MiB, so that a 150K vocab still gives ~440-row matmuls that fill the GPU.
CHUNK_ELEMENTS = 1 << 23
CHUNK_ELEMENTS_CUDA = 1 << 26


def chunk_rows(n_vocab: int, device: torch.device, *, chunk_elements: int | None = None) -> int:
    """Rows per chunk so that rows x n_vocab stays within `chunk_elements` (default by device; >= 1 row)."""
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS_CUDA if device.type == "cuda" else CHUNK_ELEMENTS
    return max(1, chunk_elements // max(1, n_vocab))


def _chunk_logits(h: Tensor, weight_c: Tensor, bias_c: Tensor | None, temperature: float) -> Tensor:
    """[rows, D] -> tempered logits [rows, V] in weight_c's (compute) dtype."""
    z = h.to(weight_c.dtype) @ weight_c.T
    if bias_c is not None:
        z += bias_c
    return z.div_(temperature)


def chunked_logprobs_forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    need_entropy: bool,
    chunk_elements: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """hidden [N, D], weight [V, D], targets [N], bias [V] or None -> (logp [N], entropy [N] or None, lse [N]).

    All outputs fp32 (fp64 for fp64 inputs); ignored rows give logp = entropy = 0 (their lse is still the
    real one). Holds one [rows, V] chunk of logits at a time.
    """
    n, v = hidden.shape[0], weight.shape[0]
    dt = compute_dtype(hidden.dtype)
    weight_c = weight.to(dt)
    bias_c = None if bias is None else bias.to(dt)
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, 0)
    logp = torch.empty(n, dtype=dt, device=hidden.device)
    lse = torch.empty(n, dtype=dt, device=hidden.device)
    entropy = torch.empty(n, dtype=dt, device=hidden.device) if need_entropy else None
    step = chunk_rows(v, hidden.device, chunk_elements=chunk_elements)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        z = _chunk_logits(hidden[rows], weight_c, bias_c, temperature)
        # log_softmax is one fused pass on CPU and GPU (several times faster than max/sub/exp/sum by hand).
        # lse from the argmax column, where log p is in [-log V, 0]: no cancellation at large logits.
        log_p = torch.log_softmax(z, dim=-1)
        z_max, arg_max = z.max(dim=-1, keepdim=True)
        lse[rows] = (z_max - log_p.gather(1, arg_max)).squeeze(1)
        logp[rows] = log_p.gather(1, safe_targets[rows].unsqueeze(1)).squeeze(1)
        if entropy is not None:
            # H = -sum p log p: a sum of non-negative terms, so no cancellation either.
            entropy[rows] = -torch.exp(log_p).mul_(log_p).sum(-1)
    logp.masked_fill_(~keep, 0.0)
    if entropy is not None:
        entropy.masked_fill_(~keep, 0.0)
    return logp, entropy, lse


def chunked_logprobs_backward(
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
    chunk_elements: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of the chunked forward. hidden [N, D], weight [V, D], targets [N], bias [V] or None,
    lse [N], entropy [N] (needed when grad_entropy is given), grad_logp [N], grad_entropy [N] or None
    -> (grad_hidden [N, D] in hidden.dtype, grad_weight [V, D] in weight.dtype, grad_bias [V] in bias.dtype),
    each None where `needs_input_grad` is False. Recomputes one chunk of logits at a time, accumulates in fp32.
    """
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy was given but entropy is None: the forward must compute entropy")
    n, v = hidden.shape[0], weight.shape[0]
    need_h, need_w, need_b = needs_input_grad
    need_b = need_b and bias is not None
    dt = compute_dtype(hidden.dtype)
    weight_c = weight.to(dt)
    bias_c = None if bias is None else bias.to(dt)
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, 0)
    # Zeroing the row coefficients of ignored rows zeroes their whole row of G; the 1/T of dz/dh is folded
    # into the O(N) coefficients instead of a pass over each chunk.
    g = torch.where(keep, grad_logp.to(dt), 0.0) / temperature
    e = None
    if grad_entropy is not None:
        e = torch.where(keep, grad_entropy.to(dt), 0.0) / temperature
        entropy_c = entropy.to(dt)
    grad_h = torch.empty(n, weight.shape[1], dtype=dt, device=hidden.device) if need_h else None
    grad_w = torch.zeros(v, weight.shape[1], dtype=dt, device=hidden.device) if need_w else None
    grad_b = torch.zeros(v, dtype=dt, device=hidden.device) if need_b else None
    step = chunk_rows(v, hidden.device, chunk_elements=chunk_elements)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        log_p = _chunk_logits(hidden[rows], weight_c, bias_c, temperature).sub_(lse[rows].to(dt).unsqueeze(1))
        p = torch.exp(log_p)
        g_c = g[rows].unsqueeze(1)
        if e is not None:
            # G = -p (g + e (log p + H)) (as z - sum p z = log p + H, free of cancellation), built in log_p's
            # buffer; + g at the target column below.
            log_p.add_(entropy_c[rows].unsqueeze(1)).mul_(e[rows].unsqueeze(1)).add_(g_c).mul_(p).neg_()
            G = log_p
        else:
            G = p.mul_(-g_c)
        G.scatter_add_(1, safe_targets[rows].unsqueeze(1), g_c)
        if grad_h is not None:
            grad_h[rows] = G @ weight_c
        if grad_w is not None:
            grad_w.addmm_(G.T, hidden[rows].to(dt))
        if grad_b is not None:
            grad_b += G.sum(0)
    return (
        None if grad_h is None else grad_h.to(hidden.dtype),
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )
