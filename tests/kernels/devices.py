"""Where a kernel test's tensors live: the Triton implementation runs natively on CUDA when there is a GPU (the
interpreter, TRITON_INTERPRET=1, is only set without one: tests/conftest.py) and under the interpreter on CPU
tensors otherwise; the eager implementations run on CPU either way (their fp64 references are on CPU too)."""

import torch

CUDA = torch.cuda.is_available()


def kernel_device(impl: str) -> torch.device:
    return torch.device("cuda" if CUDA and impl == "triton" else "cpu")


def to_kernel_device(impl: str, *tensors):
    """The tensors (None passes through) moved to `impl`'s device."""
    dev = kernel_device(impl)
    return [t.to(dev) if t is not None else None for t in tensors]
