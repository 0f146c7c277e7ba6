"""Input checks every public op shares: which implementation runs, and whether the tensors make sense.

Also the one `IGNORE_INDEX`: a target equal to it carries no loss and gets no gradient (PyTorch's default)."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

IGNORE_INDEX = -100
IMPLS = ("reference", "chunked", "triton")
IMPL_ENV = "FASTPRIME_KERNEL_IMPL"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# On CPU a tiny vocabulary makes the eager head (matmul + log_softmax, [N, V] logits) faster than the chunked
# one: fwd+bwd of the PPO loss, 1 thread, D = 128 (shared machine): V=32 N=2048 10 ms vs 27, N=8192 51 vs 108;
# at V=1024 N=2048 chunked wins (306 vs 335 ms). The element bound keeps the eager logits small in memory.
SMALL_VOCAB = 256
SMALL_LOGITS = 1 << 24


def resolve_impl(impl: str, hidden: Tensor, vocab: int | None = None) -> str:
    """'auto' -> env FASTPRIME_KERNEL_IMPL if set, else 'triton' on CUDA; on CPU 'reference' (eager) when the
    head is tiny (vocab <= SMALL_VOCAB and rows * vocab <= SMALL_LOGITS), else 'chunked'.

    An explicit impl ('reference', 'chunked', 'triton') is returned unchanged; anything else is a ValueError.
    """
    if impl == "auto":
        impl = os.environ.get(IMPL_ENV, "").strip()
        if not impl and hidden.is_cuda:
            impl = "triton"
        elif not impl:
            rows = hidden.numel() // max(hidden.shape[-1], 1) if hidden.dim() else 0
            tiny = vocab is not None and vocab <= SMALL_VOCAB and rows * vocab <= SMALL_LOGITS
            impl = "reference" if tiny else "chunked"
        if impl not in IMPLS:
            raise ValueError(f"{IMPL_ENV}={impl!r} is not one of {IMPLS}")
        return impl
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS + ('auto',)}")
    return impl


def check_inputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    impl: str,
) -> None:
    """ValueError naming the offending value unless hidden [..., D], weight [V, D], targets [...] integer
    in [0, V) or == ignore_index, bias [V] or None, temperature finite and > 0, all on one device.
    Checking target range reads one bool back from the device (a sync); it is the price of a clear error
    instead of an out-of-bounds read in a kernel."""
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, D], got {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden [..., D={hidden.shape[-1]}] and weight [V, D={weight.shape[1]}] disagree on D"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has V=0 rows: the vocabulary is empty")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading dims {tuple(hidden.shape[:-1])}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} is not one of {FLOAT_DTYPES}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} and weight dtype {weight.dtype} must match")
    if impl == "triton" and hidden.dtype == torch.float64:
        raise ValueError("impl='triton' does not take float64 inputs; use impl='chunked' or 'reference'")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias shape {tuple(bias.shape)} must be (V,) = ({weight.shape[0]},)")
    devices = {t.device for t in (hidden, weight, targets, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    # Meta tensors (shape-only runs, e.g. memory tests) have no values to check.
    if targets.numel() > 0 and targets.device.type != "meta":
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            first = targets[bad].flatten()[0].item()
            raise ValueError(
                f"targets must be in [0, V={weight.shape[0]}) or ignore_index={ignore_index}, found {first}"
            )


def flatten_head_inputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    impl: str,
) -> tuple[str, Tensor, Tensor]:
    """The input preparation every public op shares: resolve `impl`, `check_inputs`, then flatten.

    hidden [..., D], targets [...] -> (impl, hidden [N, D] with unit stride along D, targets [N] int64).
    """
    impl = resolve_impl(impl, hidden, weight.shape[0] if weight.dim() == 2 else None)
    check_inputs(hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index, impl=impl)
    h = hidden.reshape(-1, hidden.shape[-1])
    if h.stride(-1) != 1:
        h = h.contiguous()
    return impl, h, targets.reshape(-1).to(torch.int64).contiguous()


def check_per_token(targets: Tensor, **per_token: Tensor | None) -> None:
    """ValueError naming the tensor unless each given per-token tensor has targets' shape [...]."""
    for name, t in per_token.items():
        if t is not None and t.shape != targets.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal targets shape {tuple(targets.shape)}")


def flat_constant(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A per-token constant of the loss (no gradient flows into it) [...] -> detached, contiguous [N] in dtype."""
    return x.detach().reshape(-1).to(dtype).contiguous()
