"""The Triton kernels compile for Hopper (sm_90) without a GPU, every autotune config fits in an SM's shared
memory, and the 16-bit matmuls use wgmma tensor-core instructions. compile_sm90.py does the compiling in a
subprocess, because under TRITON_INTERPRET=1 (set for this suite) triton.jit builds no real kernels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="triton was built without its CUDA backend")

# cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 and H200: 227 KiB.
HOPPER_SHARED_BYTES = 232448
HEAD_KERNELS = {"_logprobs_fwd_kernel", "_logit_grad_kernel"}


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(__file__).with_name("compile_sm90.py")
    run = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


@pytest.mark.slow
def test_every_kernel_and_config_compiles_for_sm90(compiled):
    names = {row["kernel"] for row in compiled}
    assert names == HEAD_KERNELS | {"_ppo_epilogue_kernel", "_prm_scores_kernel", "_prm_grad_kernel"}
    for kernel in HEAD_KERNELS:
        for dtype in ("bf16", "fp16", "fp32"):
            assert any(r["kernel"] == kernel and r["dtype"] == dtype for r in compiled), (kernel, dtype)


@pytest.mark.slow
def test_every_config_fits_in_hopper_shared_memory(compiled):
    too_big = [row for row in compiled if row["shared_bytes"] > HOPPER_SHARED_BYTES]
    assert too_big == []


@pytest.mark.slow
def test_16bit_matmuls_use_wgmma(compiled):
    head_16bit = [r for r in compiled if r["kernel"] in HEAD_KERNELS and r["dtype"] != "fp32"]
    assert head_16bit and all(r["wgmma"] > 0 for r in head_16bit)


@pytest.mark.slow
def test_no_config_spills_kilobytes_of_registers(compiled):
    # A few hundred bytes of spill per thread stay in L1; the 128x256x64 tiles this replaced spilled 1.2-4.7 KB
    # per thread, which turns every tile's epilogue into local-memory traffic.
    assert all(row["registers"] is not None for row in compiled)
    assert [row for row in compiled if row["spill_store_bytes"] > 512] == []


@pytest.mark.parametrize(("env", "kept"), [({}, 4), ({"FASTPRIME_AUTOTUNE": "0"}, 1)])
def test_autotune_env_keeps_one_config(env, kept):
    """The GPU config lists (built only without the interpreter): FASTPRIME_AUTOTUNE=0 keeps the first 16-bit
    config of each kernel, for correctness runs that must not compile and time every config per shape."""
    code = (
        "import torch; from fastprime.kernels import triton_core as tc; "
        "h = {'H': torch.empty(0, dtype=torch.bfloat16)}; "
        "k = (tc._logprobs_fwd_kernel, tc._logit_grad_kernel); "
        "print([len(x.early_config_prune(x.configs, h)) for x in k])"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTPRIME_AUTOTUNE")}
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert run.stdout.strip() == str([kept, kept])
