import os

import torch

# The Triton path is tested everywhere: natively on CUDA, under the interpreter on a CPU-only machine.
# The interpreter is chosen when a kernel is decorated, so this must run before fastprime.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
