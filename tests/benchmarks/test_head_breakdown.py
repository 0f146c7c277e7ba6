"""benchmarks/head_breakdown.py on a CPU (interpreter, small fp32 shape): it runs every part, and each tile config
it launches by hand computes the function: the forward's log-sum-exp and target logit and the logit gradient,
each against an fp32 reference."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_head_breakdown_runs_and_every_config_agrees(tmp_path):
    out = tmp_path / "breakdown.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    args = ["--n", "48", "--d", "40", "--v", "700", "--vc", "300", "--out", str(out)]
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "head_breakdown.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["whole"]["fwd_ms"] > 0 and report["whole"]["fwd_bwd_ms"] > 0
    for part in ("fwd_configs", "grad_configs"):
        rows = report[part]
        assert len(rows) == 2 and all("error" not in r for r in rows), rows
        assert all(r["max_diff"] < 1e-4 for r in rows), rows
