"""The GPU campaign: what to run first on any GPU machine, within about 8 minutes, and a one-screen summary.

    benchmarks/gpu_campaign.sh [--out DIR] [--budget-s 480] [--dry-run] [--summarize DIR]

Steps, most decisive first, each a pytest run in a subprocess with a timeout cut to the time left:
the GPU-marked tests; the Qwen2.5-7B head (D=3584, V=152064) at N=16384, forward and forward+backward, for
eager, chunked, triton and liger; ms per token of triton and liger at N=8192 and 32768; the Qwen2.5-0.5B
head; the PPO and PRM losses at the 7B head. Each step's benchmark tables are written into the output folder
as soon as the step ends (the harness writes them there, tagged with the step's name), with its log beside.
Installs nothing but a liger-kernel wheel found in $FASTPRIME_WHEELS or .whl/ (pip --no-deps --no-index),
and only when liger_kernel is not importable. --dry-run prints the plan and runs nothing; --summarize DIR
only prints the summary of the tables already in DIR.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HEAD = "benchmarks/bench_linear_logprobs.py::test_linear_logprobs"
PPO = "benchmarks/bench_losses.py::test_bench_ppo_fwd_bwd"
PRM = "benchmarks/bench_losses.py::test_bench_prm_fwd_bwd"
SHAPE_7B = "D3584-V152064-bfloat16"
SHAPE_05B = "D896-V151936-bfloat16"


@dataclass
class Step:
    name: str
    args: list[str]  # pytest arguments after `python -m pytest`
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)


def head(n: int, shape: str, method: str, mode: str) -> str:
    return f"{HEAD}[N{n}-{shape}-{method}-{mode}]"


def plan() -> list[Step]:
    bench = ["--benchmark-enable", "-q", "-rs", "-p", "no:cacheprovider"]
    methods = ("eager", "chunked", "triton", "liger")
    return [
        # One config per kernel: each test shape is a new specialisation, and compiling and timing every
        # config for each would not fit the step.
        Step(
            "gpu_tests",
            ["-q", "-rs", "-m", "gpu", "tests", "-p", "no:cacheprovider"],
            150,
            {"FASTPRIME_AUTOTUNE": "0"},
        ),
        Step(
            "head_7b_n16384",
            [head(16384, SHAPE_7B, m, mode) for m in methods for mode in ("fwd", "fwd+bwd")] + bench,
            200,
        ),
        Step(
            "head_7b_tokens",
            [head(n, SHAPE_7B, m, "fwd+bwd") for n in (8192, 32768) for m in ("triton", "liger")] + bench,
            120,
        ),
        Step(
            "head_05b_n16384",
            [
                head(16384, SHAPE_05B, m, mode)
                for m in ("eager", "triton", "liger")
                for mode in ("fwd", "fwd+bwd")
            ]
            + bench,
            90,
        ),
        Step(
            "losses_7b_n16384",
            [f"{PPO}[N16384-{SHAPE_7B}-{m}]" for m in ("eager", "triton", "liger")]
            + [f"{PRM}[N16384-{SHAPE_7B}-{m}]" for m in ("eager", "triton")]
            + bench,
            120,
        ),
    ]


def liger_wheel() -> Path | None:
    """A liger-kernel wheel carried to the machine, if liger_kernel cannot be imported already."""
    try:
        import liger_kernel  # noqa: F401

        return None
    except ImportError:
        pass
    dirs = [Path(os.environ["FASTPRIME_WHEELS"])] if "FASTPRIME_WHEELS" in os.environ else []
    dirs.append(ROOT / ".whl")
    wheels = [w for d in dirs if d.is_dir() for w in sorted(d.glob("liger_kernel-*.whl"))]
    return wheels[-1] if wheels else None


def run_step(step: Step, out: Path, seconds_left: float) -> str:
    """Run one step with its log in out/<name>.log; returns a one-line status."""
    timeout = int(min(step.timeout_s, seconds_left))
    if timeout < 20:
        return f"{step.name}: skipped, {seconds_left:.0f} s of the budget left"
    env = {**os.environ, "FASTPRIME_BENCH_OUT": str(out), "FASTPRIME_BENCH_TAG": step.name, **step.env}
    start = time.monotonic()
    with open(out / f"{step.name}.log", "w") as log:
        try:
            rc = subprocess.run(
                [sys.executable, "-m", "pytest", *step.args], cwd=ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT, timeout=timeout, check=False,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = "timeout"
    last = (out / f"{step.name}.log").read_text().strip().splitlines()[-1:] or [""]
    return f"{step.name}: rc={rc} in {time.monotonic() - start:.0f} s | {last[0][:70]}"


def _tokens(shape: str) -> int | None:
    part = next((p for p in shape.split() if p.startswith("N=")), None)
    return int(part[2:]) if part else None


def _ratio(base: harness.Row | None, row: harness.Row) -> str:
    return f"{base.ms / row.ms:.2f}" if (base and base.ms and row.ms) else "-"


def summary(out: Path) -> list[str]:
    """One line per benchmark row found in out/*.csv: ms, ms per 1k tokens, % of peak, speed vs eager and
    vs liger of the same op, shape, dtype and mode (x > 1: faster than them)."""
    rows = [r for csv in sorted(out.glob("*.csv")) for r in harness.read_rows(csv)]
    by_key = {}
    for r in rows:
        by_key.setdefault((r.op, r.shape, r.dtype, r.mode), {})[r.method] = r
    lines = [
        f"{'op':<16}{'shape':<24}{'mode':<8}{'method':<9}{'ms':>9}{'ms/1k tok':>10}{'% peak':>8}"
        f"{'x eager':>8}{'x liger':>8}"
    ]
    for (op, shape, _dtype, mode), methods in by_key.items():
        for method, r in methods.items():
            tokens = _tokens(shape)
            per_k = f"{1000 * r.ms / tokens:.3f}" if (r.ms and tokens) else "-"
            ms = f"{r.ms:.2f}" if r.ms else (r.note or "-")
            pct = f"{r.pct_peak:.1f}" if r.pct_peak is not None else "-"
            lines.append(
                f"{op[:15]:<16}{shape[:23]:<24}{mode:<8}{method:<9}{ms:>9}{per_k:>10}{pct:>8}"
                f"{_ratio(methods.get('eager'), r):>8}{_ratio(methods.get('liger'), r):>8}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: a new one under results/)"
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for all steps together")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument(
        "--summarize", type=Path, default=None, help="only summarise the tables in this folder"
    )
    args = parser.parse_args(argv)
    if args.summarize is not None:
        print("\n".join(summary(args.summarize)))
        return 0
    out = args.out or ROOT / "benchmarks" / "results" / time.strftime("campaign_%Y%m%d_%H%M%S")
    wheel = liger_wheel()
    install = (
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)] if wheel else None
    )
    if args.dry_run:
        print(f"out: {out}")
        print(f"install: {' '.join(install) if install else 'nothing'}")
        for step in plan():
            print(f"step {step.name} (timeout {step.timeout_s} s): python -m pytest {' '.join(step.args)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if install:
        subprocess.run(install, check=False)
    deadline = time.monotonic() + args.budget_s
    status = [run_step(step, out, deadline - time.monotonic()) for step in plan()]
    lines = [f"device: {harness.device_name()}  peak {harness.peak_tflops()} TFLOP/s  out: {out}", *status]
    lines += summary(out)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
