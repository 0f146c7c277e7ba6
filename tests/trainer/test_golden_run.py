"""Behaviour pin: a short seeded CPU run of `python trainer/main.py` must give the recorded metrics.jsonl values.

golden/golden_metrics.jsonl holds every value of golden/golden_run.yaml's run (time and throughput keys aside),
first recorded before the issue-8 restructure; `git log` on it says what each re-recording changed (last:
rollout rounds sized by the filter's pass rate, 8d96d69). Any change to a loss, accuracy, reward, advantage or
count fails here; a deliberate change re-records with `FASTPRIME_RECORD_GOLDEN=1 python -m pytest -q
tests/trainer/test_golden_run.py` and says why in its commit.

The run uses one thread (OMP_NUM_THREADS=1): CPU matmul reductions may sum in another order with more threads,
and sampling turns a last-bit difference into other tokens. For the same reason it pins torch's vectorised CPU
kernels to AVX2 (ATEN_CPU_CAPABILITY, MKL_CBWR, ONEDNN_MAX_CPU_ISA): the values recorded on an AVX2 machine came
out different on an AVX-512 one from the first rollout on (2026-12-04: 80 instead of 88 responses at step 1), and
with AVX2 kernels on both only one sampled token differed there. What still differs between CPUs (MKL's code
path by vendor, another architecture) can move the values; then the test fails on the first rollout counts,
and a re-recording on the new machine says so in its commit.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

from hosts import CPU_ONLY_ENV

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIG = HERE / "golden" / "golden_run.yaml"
RECORDED = HERE / "golden" / "golden_metrics.jsonl"
UNTIMED_SKIP = ("time/", "perf/", "warmstart/seconds")
SAME_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _values(path: pathlib.Path) -> list[dict]:
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [{k: v for k, v in r.items() if not k.startswith(UNTIMED_SKIP)} for r in records]


def _differences(got: list[dict], want: list[dict]) -> list[str]:
    if len(got) != len(want):
        return [f"{len(got)} records, recorded {len(want)}"]
    out = []
    for g, w in zip(got, want):
        step = w.get("step")
        for key in sorted(set(g) | set(w)):
            if key not in g or key not in w:
                out.append(f"step {step} {key}: {'missing' if key not in g else 'new'}")
                continue
            a, b = g[key], w[key]
            same = (
                math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
                if isinstance(a, float) or isinstance(b, float)
                else a == b
            ) if a is not None and b is not None else a is b  # fmt: skip
            if not same:
                out.append(f"step {step} {key}: {a!r}, recorded {b!r}")
    return out


def test_golden_run_gives_the_recorded_values(tmp_path):
    env = {
        **os.environ,
        **CPU_ONLY_ENV,
        **SAME_KERNELS,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, str(REPO / "trainer" / "main.py"), "--config", str(CONFIG)]
    cmd += ["--run.output-dir", str(tmp_path), "--run.name", "golden"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _values(tmp_path / "golden" / "metrics.jsonl")
    if os.environ.get("FASTPRIME_RECORD_GOLDEN") == "1":
        RECORDED.write_text("".join(json.dumps(r) + "\n" for r in got))
    want = _values(RECORDED)
    assert any(r.get("prm/loss") and r.get("advantages/std") for r in want), (
        "the recorded run trained nothing"
    )
    problems = _differences(got, want)
    assert not problems, "metrics differ from the recorded golden run:\n" + "\n".join(problems)
