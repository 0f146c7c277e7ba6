"""Compile every Triton kernel of fastprime.kernels, with every autotune config it would try, for Hopper (sm_90),
on a machine without a GPU: `python tests/kernels/compile_sm90.py` prints one JSON line per compiled kernel.

Triton's CUDA backend lowers to PTX and runs the bundled ptxas without a driver, so this catches what the
interpreter cannot: compile errors, configs that need more shared memory than an SM has (the autotuner would
drop them at run time, after a compile each), and dots that miss Hopper's wgmma tensor-core instructions.
Must run without TRITON_INTERPRET (triton.jit then builds real JIT functions and the GPU config lists).
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from fastprime.kernels import ppo_loss, prm_loss, triton_core

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# The real launch at the 7B head (N=16384, D=3584, V=152064, Vc a multiple of 256) has every pointer 16-byte
# aligned and these integers divisible by 16; Triton specialises on both ("tt.divisibility" 16), and without
# the hints it compiles a variant with narrow loads that it does not pipeline, which never runs there.
DIVISIBLE_INTS = {"N", "V", "D", "stride_hn", "stride_wv", "stride_gn"}


def launch_hints(fn, types: dict) -> dict:
    """{(arg index,): [["tt.divisibility", 16]]} for each pointer and each DIVISIBLE_INTS argument."""
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name in types and (types[name].startswith("*") or name in DIVISIBLE_INTS)
    }


def compile_one(kernel, types: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> dict:
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs=constexprs, attrs=launch_hints(fn, types)),
        target=TARGET,
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    return {
        "kernel": fn.__name__,
        "shared_bytes": compiled.metadata.shared,
        "wgmma": compiled.asm["ptx"].count("wgmma.mma_async"),
        **ptxas_usage(compiled.asm["ptx"]),
    }


def ptxas_usage(ptx: str) -> dict:
    """Registers and spill bytes per thread, from the ptxas Triton uses, with its register-allocation flag
    (the compiled kernel's metadata only learns its register count from a driver)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        cmd = [get_ptxas(TARGET.arch).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(src)]
        log = subprocess.run([*cmd, "-o", str(src.with_suffix(".o"))], capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_store_bytes": int(spills.group(1)) if spills else 0,
    }


def head_kernels():
    for dtype, name in TYPES.items():
        precision = "ieee" if dtype == torch.float32 else "tf32"
        inputs = {"H": "*" + name, "W": "*" + name, "B": "*" + name, "TGT": "*i64", "G": "*" + name}
        scalars = {k: "i32" for k in ("N", "V", "D", "stride_hn", "stride_wv", "stride_gn", "n_split")}
        f32 = {k: "*fp32" for k in ("M_OUT", "S_OUT", "A_OUT", "ZT_OUT", "LSE", "GL", "GE", "ENT")}
        types = {**inputs, **scalars, **f32, "temperature": "fp32"}
        common = dict(HAS_BIAS=True, HAS_TEMPERATURE=True, GROUP_N=triton_core.GROUP_N)
        for kernel, flags in (
            (triton_core._logprobs_fwd_kernel, dict(common, NEED_ENTROPY=True)),
            (triton_core._logit_grad_kernel, dict(common, HAS_GE=True)),
        ):
            named_args = {"H": torch.empty(0, dtype=dtype, device="meta")}
            prune = kernel.early_config_prune or (lambda configs, _: configs)
            for config in prune(kernel.configs, named_args):
                constexprs = {**flags, "DOT_PRECISION": precision, **config.kwargs}
                row = compile_one(kernel, types, constexprs, config.num_warps, config.num_stages)
                yield {**row, "dtype": name, "config": config.kwargs, "num_warps": config.num_warps,
                       "num_stages": config.num_stages}  # fmt: skip


def epilogue_kernels():
    ppo_types = {name: "*fp32" for name in ppo_loss._ppo_epilogue_kernel.arg_names if name.endswith("_ptr")}
    ppo_types.update(tgt_ptr="*i64", code_ptr="*i8", N="i32", ignore_index="i32")
    ppo_types.update({k: "fp32" for k in ("clip_low", "clip_high", "dual_clip", "kl_coef", "entropy_coef")})
    flags = dict(HAS_REF=True, HAS_DUAL=True, HAS_ENT=True, BLOCK=1024)
    yield {**compile_one(ppo_loss._ppo_epilogue_kernel, ppo_types, flags), "dtype": "fp32"}
    for kernel in (prm_loss._prm_scores_kernel, prm_loss._prm_grad_kernel):
        types = {name: "*fp32" for name in kernel.arg_names if name.endswith("_ptr")}
        types.update(tgt_ptr="*i64", seq_ptr="*i64", N="i32", ignore_index="i32")
        yield {**compile_one(kernel, types, dict(BLOCK=1024)), "dtype": "fp32"}


def markdown_row(row: dict) -> str:
    """One line of benchmarks/results/sm90_compile.md's table."""
    c = row.get("config")
    tile = " x ".join(str(c[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")) if c else "BLOCK 1024"
    return (
        f"| {row['kernel']} | {row['dtype']} | {tile} | {row.get('num_warps', 4)} | {row.get('num_stages', 3)} "
        f"| {row['shared_bytes'] // 1024} | {row['registers']} | {row['spill_store_bytes']} | {row['wgmma']} |"
    )


if __name__ == "__main__":
    # --markdown: the table rows of benchmarks/results/sm90_compile.md instead of JSON lines.
    as_markdown = "--markdown" in sys.argv[1:]
    for row in (*head_kernels(), *epilogue_kernels()):
        print(markdown_row(row) if as_markdown else json.dumps(row), flush=True)
    sys.exit(0)
