"""The vLLM loop on a GPU: sleep mode between phases and model.offload in a real `trainer/main.py` run.

CUDA and the `vllm` extra only; written with the CPU tests beside it but NOT run on the CPU-only development
machine. The engine samples in bf16 while the trainer computes bf16-over-fp32 log-probs, so the agreement bound
is looser than the CPU test's fp32-vs-fp32 1e-2."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm", reason="the vllm extra is not installed (see README)")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="sleep mode and offload need CUDA"),
]

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_demo_run_with_sleep_mode_and_offload(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "trainer" / "main.py"),
        "--config",
        str(HERE / "vllm_configs" / "demo_run.yaml"),
    ]
    cmd += ["--run.output-dir", str(tmp_path), "--run.name", "gpu", "--rollout.backend", "vllm"]
    cmd += ["--rollout.sleep-mode", "--rollout.gpu-memory-utilization", "0.3", "--model.offload"]
    cmd += ["--rollout.kv-cache-bytes", "0"]  # on GPU: sized by gpu_memory_utilization
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(ln) for ln in lines if ln.strip()]
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert math.isfinite(r["rollout/logprob_diff_max"])
        assert r["rollout/logprob_diff_mean"] < 0.05, r
