"""PRIME vs outcome-only RLOO with the same budget on several seeds (issue 12, part 3): runs, table, plot.

    python benchmarks/prime_vs_rloo.py                                   # demo config, prime + rloo, seeds 0 1 2
    python benchmarks/prime_vs_rloo.py --variants prime prime-before prime-none rloo --seeds 0 1 2 3
    python benchmarks/prime_vs_rloo.py --train.iterations 50             # unknown flags go to trainer/main.py
    python benchmarks/prime_vs_rloo.py --report-only                     # only table + plot from finished runs

Each seed's warm start runs once (`trainer/main.py --train.iterations 0`, in <out>/warmstart_seed<S>, with no
wall-time guard) and every variant of that seed starts from its exported weights (`--model.source path`): the
variants are compared from the same SFT model, and the start does not depend on how busy the machine was (the
demo's `warmstart.max_seconds` guard would stop a loaded run earlier, at a lower accuracy). Each run is
`python trainer/main.py <passed flags> <variant flags> --train.seed S` in its own folder <out>/<variant>_seed<S>,
`--jobs` at a time, with OMP_NUM_THREADS set. A run whose metrics.jsonl reaches the configured last iteration
(with its final evaluation) is skipped, an unfinished one with a checkpoint resumes (`--run.resume auto`), one
without is started over: the command can be spread over sessions. The table (<results>.md) and plot
(<results>.png) use the finished runs only; numbers: prime_vs_rloo_report.py.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import threading
import time

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import prime_vs_rloo_report as report  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Flags each variant adds after the passed-through ones (the last occurrence of a flag wins).
VARIANTS = {
    "prime": ["--prm.update", "after"],
    "prime-before": ["--prm.update", "before"],
    "prime-none": ["--prm.update", "none"],
    # 30 iterations that train only the PRM on the warm-started policy's samples, then the same 100 RL iterations
    "prime-warmup": ["--prm.update", "after", "--prm.warmup-iterations", "30"],
    # the PRM's logits unscaled, as published (the demo config trains a logit scale: prm.logit_scale_lr)
    "prime-no-scale": ["--prm.update", "after", "--prm.logit-scale-lr", "0"],
    "rloo": ["--algorithm.process-coef", "0"],
}
META = "bench_meta.json"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--variants", nargs="+", default=["prime", "rloo"], choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", default="runs/prime_vs_rloo", help="parent folder of the run folders")
    p.add_argument("--results", default="benchmarks/results/prime_vs_rloo",
                   help="path stem of the table (.md) and plot (.png)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (e.g. 2 runs of 1 thread on 2 cores)")
    p.add_argument("--window", type=int, default=10, help="iterations of the trailing mean of the curves")
    p.add_argument("--report-only", action="store_true", help="run nothing, only write table and plot")
    args, trainer_flags = p.parse_known_args(argv)
    if len(args.seeds) < 3:
        print(f"note: {len(args.seeds)} seed(s); the issue asks for >= 3", file=sys.stderr)
    return args, trainer_flags


def run_state(run_dir: pathlib.Path) -> str:
    """'done' (metrics reach the configured last iteration with its evaluation), 'resume' (a checkpoint to go
    on from), 'fresh' (nothing usable)."""
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if metrics.exists() and config.exists():
        iterations = yaml.safe_load(config.read_text())["train"]["iterations"]
        records = report.read_records(metrics)
        if records and records[-1]["step"] == iterations and records[-1].get(report.EVAL_ACC) is not None:
            return "done"
    checkpoints = run_dir / "checkpoints"
    return "resume" if checkpoints.is_dir() and any(checkpoints.iterdir()) else "fresh"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {os.cpu_count()} CPU cores ({platform.machine()}), {gpu}, torch {torch.__version__}"


def warm_start(out: pathlib.Path, seed: int, trainer_flags: list[str], threads: int) -> list[str]:
    """The seed's warm-started model (trained once, shared by its variants): the flags that start from it."""
    run_dir = out / f"warmstart_seed{seed}"
    if not (run_dir / "hf" / "config.json").exists():
        flags = [*trainer_flags, "--train.iterations", "0", "--warmstart.max-seconds", "1e9"]
        _run(run_dir, "fresh", flags, seed, threads)
    return ["--model.source", "path", "--model.path", str(run_dir / "hf")]


def train(run_dir: pathlib.Path, variant: str, seed: int, trainer_flags: list[str], threads: int) -> None:
    """One variant run from its seed's warm start, unless finished; resumed where a checkpoint exists."""
    state = run_state(run_dir)
    if state == "done":
        print(f"[skip] {run_dir.name}: finished", flush=True)
        return
    start = warm_start(run_dir.parent, seed, trainer_flags, threads)  # already trained by run_all
    _run(run_dir, state, [*trainer_flags, *start, *VARIANTS[variant]], seed, threads)


def _run(run_dir: pathlib.Path, state: str, flags: list[str], seed: int, threads: int) -> None:
    """`trainer/main.py flags` as a subprocess (output to run_dir/log.txt), with its machine, times and command
    in bench_meta.json."""
    if state == "fresh" and run_dir.exists():
        shutil.rmtree(run_dir)  # a start that died before its first checkpoint: nothing to resume from
    cmd = [sys.executable, "trainer/main.py", *flags, "--train.seed", str(seed),
           "--run.output-dir", str(run_dir.parent), "--run.name", run_dir.name, "--run.no-progress"]  # fmt: skip
    if state == "resume":
        cmd += ["--run.resume", "auto"]
    print(f"[{state}] {run_dir.name}: {' '.join(cmd)}", flush=True)
    started, t0 = datetime.datetime.now(datetime.UTC), time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "a") as log:
        rc = subprocess.run(
            cmd, cwd=ROOT, env=env, check=False, stdout=log, stderr=subprocess.STDOUT
        ).returncode
    meta = {"machine": machine(), "started_utc": started.isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - t0, 1), "returncode": rc, "command": cmd, "resumed": state == "resume"}  # fmt: skip
    with open(run_dir / META, "a") as f:  # appended: a resumed run keeps each session's line
        f.write(json.dumps(meta) + "\n")
    print(f"[{'done' if rc == 0 else f'exit {rc}'}] {run_dir.name} in {meta['wall_s']:.0f} s", flush=True)
    if rc != 0:
        raise SystemExit(
            f"{run_dir.name} failed with exit code {rc} (see its log.txt); rerun the same command to resume it"
        )


def run_all(out: pathlib.Path, args: argparse.Namespace, trainer_flags: list[str]) -> None:
    """Every (seed, variant) run, `args.jobs` at a time, seed-major (early seeds finish first); the warm starts
    are queued first, and a run waits for its seed's (a lock per seed: each is trained once)."""
    locks = {s: threading.Lock() for s in args.seeds}

    def warm(seed: int) -> None:
        with locks[seed]:
            warm_start(out, seed, trainer_flags, args.threads)

    def run(variant: str, seed: int) -> None:
        warm(seed)
        train(out / f"{variant}_seed{seed}", variant, seed, trainer_flags, args.threads)

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(warm, s) for s in args.seeds]
        futures += [pool.submit(run, v, s) for s in args.seeds for v in args.variants]
        for f in concurrent.futures.as_completed(futures):
            f.result()


def finished_runs(
    out: pathlib.Path, variants: list[str], seeds: list[int]
) -> tuple[dict, list[str], list[dict]]:
    """variant -> records of each finished seed; the names of the missing runs; every run's meta lines."""
    runs, missing, metas = {}, [], []
    for variant in variants:
        for seed in seeds:
            run_dir = out / f"{variant}_seed{seed}"
            if run_state(run_dir) != "done":
                missing.append(run_dir.name)
                continue
            runs.setdefault(variant, []).append(report.read_records(run_dir / "metrics.jsonl"))
            if (run_dir / META).exists():
                metas += [json.loads(ln) for ln in (run_dir / META).read_text().splitlines() if ln.strip()]
    return runs, missing, metas


def header(trainer_flags: list[str], seeds: list[int], missing: list[str], metas: list[dict]) -> str:
    machines = sorted({m["machine"] for m in metas}) or ["unknown (no bench_meta.json)"]
    dates = sorted(m["started_utc"] for m in metas)
    when = f"{dates[0]} .. {dates[-1]} (run starts, UTC)" if dates else "unknown"
    wall = sum(m["wall_s"] for m in metas)
    flags = " ".join(trainer_flags) or "(none: configs/demo.yaml)"
    lines = ["# PRIME vs outcome-only RLOO (issue 12, part 3)", "",
             f"Written {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC by `benchmarks/prime_vs_rloo.py`.",
             f"- Machine: {'; '.join(machines)}", f"- Runs: {when}, {wall / 60:.0f} min of training wall time in all",
             f"- Trainer flags passed: `{flags}`; seeds {seeds}",
             "- Variants: prime = PRM update after (the default), prime-before / prime-none = `--prm.update`, "
             "prime-warmup = 30 PRM-only iterations first (`--prm.warmup-iterations 30`, compared at equal RL "
             "iterations), prime-no-scale = no trained logit scale on the PRM (`--prm.logit-scale-lr 0`), "
             "rloo = `--algorithm.process-coef 0` (PRM off)"]  # fmt: skip
    if missing:
        lines.append(f"- Not finished, left out: {', '.join(missing)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args, trainer_flags = parse_args(argv)
    out = pathlib.Path(args.out) if pathlib.Path(args.out).is_absolute() else ROOT / args.out
    if not args.report_only:
        run_all(out, args, trainer_flags)
    runs, missing, metas = finished_runs(out, args.variants, args.seeds)
    if not runs:
        raise SystemExit(f"no finished run under {out}")
    head = header(trainer_flags, args.seeds, missing, metas)
    stem = pathlib.Path(args.results) if pathlib.Path(args.results).is_absolute() else ROOT / args.results
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = stem.with_suffix(".md")
    md.write_text(report.table(runs, args.window, head) + f"\n![curves]({stem.name}.png)\n")
    title = head.splitlines()[3].removeprefix("- ") + " | " + head.splitlines()[4].removeprefix("- ")
    png = report.plot(runs, args.window, title, stem.with_suffix(".png"))
    print(md.read_text(), flush=True)
    print(f"table: {md}\nplot: {png}", flush=True)


if __name__ == "__main__":
    main()
