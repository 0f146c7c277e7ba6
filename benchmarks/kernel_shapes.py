"""The shapes both kernel benchmarks time, as pytest params (n, d, v, dtype)."""

from __future__ import annotations

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
# (N tokens, D, V): the Qwen2.5-7B and Qwen2.5-0.5B lm_heads, bf16 as in training.
GPU_SHAPES = [(n, d, v) for d, v in [(3584, 152064), (896, 151936)] for n in (8192, 16384, 32768)]


def shape_params(cpu_shapes: list[tuple[int, int, int]]) -> list:
    """GPU_SHAPES in bf16 and the small `cpu_shapes` in fp32, as params of (n, d, v, dtype).

    The GPU shapes are skipped at collection without CUDA, so nothing of their size is allocated on a CPU;
    the CPU shapes run only without CUDA (on a GPU they would add rows that measure launch overhead).
    """
    on_gpu = [pytest.mark.gpu, pytest.mark.skipif(not ON_CUDA, reason="GPU shape: needs a CUDA GPU")]
    on_cpu = [pytest.mark.skipif(ON_CUDA, reason="CPU shape: a GPU run times the GPU shapes")]
    return [
        pytest.param(n, d, v, dtype, marks=marks, id=f"N{n}-D{d}-V{v}-{str(dtype).removeprefix('torch.')}")
        for shapes, dtype, marks in (
            (GPU_SHAPES, torch.bfloat16, on_gpu),
            (cpu_shapes, torch.float32, on_cpu),
        )
        for n, d, v in shapes
    ]
