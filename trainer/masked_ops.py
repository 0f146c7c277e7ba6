"""Masked tensor helpers shared by the PRIME algorithm functions: input checks, masked statistics, returns.

All tensors are `[n, T]` response-token tensors (n responses, T padded response length) with a mask that marks
the valid tokens (EOS included). Every helper leaves positions outside the mask at exactly zero.
"""

from __future__ import annotations

import torch
from torch import Tensor


def float_dtype(x: Tensor) -> torch.dtype:
    """The dtype the algorithm computes in: at least fp32 (bf16/fp16 inputs are upcast), fp64 kept."""
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


def check_vector(x: Tensor, name: str, n: int | None = None) -> None:
    """Raise ValueError unless `x` is a finite 1-D tensor (of length `n` when given)."""
    if not isinstance(x, Tensor) or x.dim() != 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 1-D tensor [n], got {shape}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} entries, expected {n}")
    bad = ~torch.isfinite(x.float())
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {x[i].item()} is not finite")


def check_group_size(n: int, k: int, *, min_k: int = 1) -> None:
    """Raise ValueError unless the n responses split into whole groups of `k >= min_k` samples."""
    if not isinstance(k, int) or k < min_k:
        raise ValueError(f"k = {k!r} must be an integer >= {min_k}")
    if n % k != 0:
        raise ValueError(f"n = {n} responses do not split into groups of k = {k} (n % k = {n % k})")


def check_mask(mask: Tensor, shape: torch.Size | None = None, *, nonempty_rows: bool = True) -> Tensor:
    """Return `mask` [n, T] as bool after checking its shape and that every row has a valid token."""
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a 2-D tensor [n, T], got {got}")
    if shape is not None and mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if mask.dtype != torch.bool:
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("mask must hold only 0/1 (or bool) values")
        mask = mask.bool()
    if nonempty_rows:
        empty = ~mask.any(dim=1)
        if empty.any():
            raise ValueError(f"response {int(empty.nonzero()[0, 0])} has no valid token in mask")
    return mask


def check_token_tensor(x: Tensor, mask: Tensor, name: str) -> None:
    """Raise ValueError unless `x` has the mask's [n, T] shape and is finite on every valid token.

    Padding positions may hold anything (NaN included): they are ignored, never multiplied in.
    """
    if not isinstance(x, Tensor) or x.shape != mask.shape:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} has shape {got}, expected the mask's {tuple(mask.shape)}")
    bad = ~torch.isfinite(x.float()) & mask
    if bad.any():
        i, t = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{name}[{i}, {t}] = {x[i, t].item()} is not finite on a valid token")


def last_token_index(mask: Tensor) -> Tensor:
    """Index [n] (long) of the last valid token of each row of a bool mask [n, T]."""
    t = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, t, -1).amax(dim=1)


def place_on_last_token(values: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[n, T] tensor that holds `values` [n] on each row's last valid token and zero elsewhere."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    rows = torch.arange(mask.shape[0], device=mask.device)
    out[rows, last_token_index(mask)] = values.to(dtype)
    return out


def masked_mean_per_row(x: Tensor, mask: Tensor) -> Tensor:
    """Mean [n] of x [n, T] over each row's valid tokens (rows must be non-empty)."""
    return torch.where(mask, x, 0).sum(dim=1) / mask.sum(dim=1)


def reverse_discounted_cumsum(x: Tensor, mask: Tensor, *, gamma: float = 1.0) -> Tensor:
    """G[i, t] = sum_{s >= t, s valid} gamma^(s - t) x[i, s] on valid tokens, 0 elsewhere; x, mask [n, T].

    gamma = 1 is one flipped cumsum (the reference code's `flip.cumsum.flip`); gamma < 1 is a backward loop
    over T (O(T) small kernels; a closed form with gamma^-s overflows for long responses).
    """
    x = torch.where(mask, x, 0)
    if gamma == 1.0:
        g = x.flip(-1).cumsum(-1).flip(-1)
    else:
        g = torch.zeros_like(x)
        running = torch.zeros_like(x[:, 0])
        for t in range(x.shape[1] - 1, -1, -1):
            running = x[:, t] + gamma * running
            g[:, t] = running
    return torch.where(mask, g, 0)


def masked_whiten(x: Tensor, mask: Tensor) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over all valid tokens of the batch, 0 outside the mask; x, mask [n, T].

    Matches the reference code: PRIME's `compute_rloo_advantage_return` calls verl's
    `verl.utils.torch_functional.masked_whiten(values, mask)` whose `masked_var` defaults to `unbiased=True`
    (Bessel correction N/(N-1)) and whose `shift_mean=True` default leaves the mean at zero (it is NOT added
    back). verl raises on a single valid token (N - 1 = 0); so do we.
    """
    count = int(mask.sum())
    if count < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens in the batch, got {count}")
    xm = torch.where(mask, x, 0)
    mean = xm.sum() / count
    var = (torch.where(mask, x - mean, 0) ** 2).sum() / (count - 1)
    return torch.where(mask, (x - mean) * torch.rsqrt(var + 1e-8), 0)
