"""On CUDA: liger-kernel's fused RMSNorm, SwiGLU and RoPE for the model body (issue 14), where installed.

The head stays fastprime's own fused kernels (HeadlessLM never computes logits), so liger's cross-entropy patches
stay off. liger-kernel is optional: without it, or on CPU, or for a model type liger does not know, the body runs
unpatched and `apply_body_kernels` says why in its return value.
"""

from __future__ import annotations

from torch import nn


def apply_body_kernels(lm: nn.Module, device_type: str) -> str:
    """Patch `lm` in place with liger's RMSNorm/SwiGLU/RoPE when on CUDA; returns what was done (for the log)."""
    if device_type != "cuda":
        return "liger: off (not on CUDA)"
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        return "liger: off (liger-kernel not installed)"
    model_type = getattr(lm.config, "model_type", "")
    patch = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if patch is None:
        return f"liger: off (no patch for model_type {model_type!r})"
    patch(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=lm
    )
    return f"liger: RMSNorm, SwiGLU, RoPE patched for {model_type}"
