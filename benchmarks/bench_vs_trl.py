"""Side by side: TRL's GRPOTrainer against fastprime on the same model, data and budget (issue 14).

Run: python benchmarks/bench_vs_trl.py [--runs 3] [--iterations 4] [--out benchmarks/results/vs_trl_cpu.md]
Needs TRL (optional, not a fastprime dependency): pip install "trl==1.16.0" "transformers>=5.16.1,<5.20".

Both sides get the demo policy (the tiny Qwen2 from its seed-0 initialisation, no warm start), the demo problems,
16 prompts x 4 samples per iteration, <= 64 new tokens at temperature 1, lr 1e-4, one optimizer step per
iteration, no filter. Two pairs:
- outcome-only: TRL beta 0 (no reference model) vs fastprime `--algorithm.process-coef 0` (no PRM, no reference);
- with a reference: TRL beta 0.04 (a reference forward for the KL) vs PRIME (`--algorithm.process-coef 0.1`:
  reference forward plus the PRM's forward, backward and step).
Each run is a fresh subprocess; TRL and fastprime runs alternate (so a load change hits both). The first
iteration of each run is warm-up and is left out; the table gives the median over the remaining iterations of all
runs, per-phase medians, the mean generated length per response (the policies diverge after the first update, so
lengths are reported to show the work was comparable) and the ratio fastprime / TRL.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
PROMPTS, SAMPLES, NEW_TOKENS, LR = 16, 4, 64, 1e-4
OUTSIDE = {"time/checkpoint_s", "time/eval_s"}  # fastprime's end-of-run work, left out of its iteration time
PAIRS = {"outcome-only": (0.0, "0"), "with a reference": (0.04, "0.1")}  # (TRL beta, fastprime process_coef)


def trl_worker(beta: float, iterations: int, out: str) -> None:
    """One TRL GRPOTrainer run; writes one JSON line per optimizer step (time, profiling phases, lengths)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from fastprime.trainer.demo import build_tiny_model, build_tokenizer, make_arithmetic_rows
    from fastprime.trainer.verifiers.math_equal import score_math

    torch.manual_seed(0)
    tok = build_tokenizer()
    tok.padding_side = "left"
    # TRL builds its reference model (beta > 0) with from_pretrained(model name): give it a local folder
    model_dir = tempfile.mkdtemp()
    build_tiny_model(tok, seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = make_arithmetic_rows(PROMPTS * (iterations + 1), seed=0)
    ds = Dataset.from_list(
        [{"prompt": r["prompt"], "answer": r["reward_model"]["ground_truth"]} for r in rows]
    )

    def accuracy(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [score_math(t, a)[0] for t, a in zip(texts, answer)]

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        max_steps=iterations, per_device_train_batch_size=PROMPTS * SAMPLES, num_generations=SAMPLES,
        gradient_accumulation_steps=1, num_iterations=1, max_completion_length=NEW_TOKENS, temperature=1.0,
        learning_rate=LR, beta=beta, seed=0, bf16=False, dataloader_num_workers=0, lr_scheduler_type="constant",
        warmup_steps=0,
    )  # fmt: skip
    lines: list[dict] = []

    phases: dict[str, float] = {}

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with its phases timed (TRL's own profiling reports only to wandb/mlflow/trackio):
        rollout = `_generate`, verify = `_calculate_rewards`, prepare = all of `_generate_and_score_completions`
        (also the old/reference log-prob passes), train_step = `training_step` (forward + backward, with prepare
        inside it on the step that generates); the optimizer step is the rest of the iteration."""

        def _timed(self, name, fn, *a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0

        def _generate(self, *a, **k):
            return self._timed("rollout", super()._generate, *a, **k)

        def _calculate_rewards(self, *a, **k):
            return self._timed("verify", super()._calculate_rewards, *a, **k)

        def _generate_and_score_completions(self, *a, **k):
            return self._timed("prepare", super()._generate_and_score_completions, *a, **k)

        def training_step(self, *a, **k):
            return self._timed("train_step", super().training_step, *a, **k)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            phases.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            lines.append(
                {"iteration_s": time.perf_counter() - self.t0, **{f"phase/{n}": v for n, v in phases.items()}}
            )

        def on_log(self, _args, _state, _control, logs=None, **k):
            if lines and logs:
                lines[-1].update({k: v for k, v in logs.items() if isinstance(v, (int, float))})

    TimedGRPOTrainer(
        model=model_dir,
        reward_funcs=accuracy,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Clock()],
    ).train()
    pathlib.Path(out).write_text("".join(json.dumps(r) + "\n" for r in lines))


def fastprime_run(process_coef: str, iterations: int, workdir: pathlib.Path, env: dict) -> list[dict]:
    cmd = [
        sys.executable, str(REPO / "trainer" / "main.py"), "--config", str(REPO / "configs" / "bench_e2e.yaml"),
        "--run.output-dir", str(workdir), "--run.name", "fp", "--train.iterations", str(iterations),
        "--train.batch-size", str(PROMPTS), "--rollout.n-samples", str(SAMPLES),
        "--rollout.max-new-tokens", str(NEW_TOKENS), "--policy.lr", str(LR), "--policy.mini-batches", "1",
        "--prm.mini-batches", "1", "--algorithm.process-coef", process_coef,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, cwd=workdir, stdout=subprocess.DEVNULL)
    recs = [json.loads(x) for x in (workdir / "fp" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in recs if r.get("step", 0) > 0]


def trl_run(beta: float, iterations: int, workdir: pathlib.Path, env: dict) -> list[dict]:
    out = workdir / "trl.jsonl"
    cmd = [
        sys.executable,
        __file__,
        "--trl-worker",
        str(beta),
        "--iterations",
        str(iterations),
        "--json",
        str(out),
    ]
    subprocess.run(
        cmd, check=True, env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return [json.loads(x) for x in out.read_text().splitlines() if x.strip()]


def median_of(recs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in recs if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def summarize(side: str, runs: list[list[dict]]) -> dict:
    """Median per-iteration time, per-phase times and generated length over all runs, warm-up left out."""
    recs = [r for run in runs for r in run[1:]]
    if side == "trl":
        phases = sorted({k for r in recs for k in r if k.startswith("phase/")})
        return {
            "iteration_s": median_of(recs, "iteration_s"),
            "length": median_of(recs, "completions/mean_length"),
            "phases": {p.removeprefix("phase/"): median_of(recs, p) for p in phases},
        }
    for r in recs:  # the run's end-of-run checkpoint (and evaluation) is no part of TRL's timed step
        r["train_s"] = r["time/iteration_s"] - r.get("time/checkpoint_s", 0.0) - r.get("time/eval_s", 0.0)
    phases = sorted({k for r in recs for k in r if k.startswith("time/")} - {"time/iteration_s"} - OUTSIDE)
    return {
        "iteration_s": median_of(recs, "train_s"),
        "length": median_of(recs, "response/length_mean"),
        "phases": {p[5:-2]: median_of(recs, p) for p in phases},
        "old_pass_skipped": median_of(recs, "logprob/old_pass_skipped"),
    }


def fmt_phases(phases: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in phases.items() if v is not None)


def prime_extra_by_phase(prime: dict) -> float:
    """PRIME's extra cost over outcome-only from within its own iterations: (reference + PRM) / (the rest).

    Dividing medians of different runs mixes in the run-to-run drift of a shared host (runs of one command
    differed by up to 30%); the phases of one iteration share its conditions."""
    extra = prime["phases"].get("logprob_ref", 0.0) + prime["phases"].get("prm", 0.0)
    return extra / (prime["iteration_s"] - extra)


def report(results: dict, args, load_before, load_after, started: str) -> str:
    lines = [
        "# fastprime vs TRL GRPOTrainer, CPU (benchmarks/bench_vs_trl.py)",
        "",
        f"Machine: {platform.machine()} {os.cpu_count()}-core CPU, {platform.platform()}; python "
        f"{platform.python_version()}; started {started} UTC. Load average (1, 5, 15 min) {load_before} before, "
        f"{load_after} after (the runs' own load included), on {os.cpu_count()} cores. Other jobs inflate "
        "absolute times; ratios from alternating runs are the comparable numbers.",
        f"Budget: {PROMPTS} prompts x {SAMPLES} samples, <= {NEW_TOKENS} new tokens, lr {LR}, one optimizer "
        f"step per iteration, no filter; {args.runs} alternating runs per side, {args.iterations} iterations "
        "each, the first left out (warm-up); medians over the rest. OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        "",
        "| pair | TRL s/iteration | fastprime s/iteration | fastprime / TRL | TRL length | fastprime length |",
        "|---|---|---|---|---|---|",
    ]
    for pair, r in results.items():
        t, f = r["trl"], r["fastprime"]
        ratio = f["iteration_s"] / t["iteration_s"]
        lines.append(
            f"| {pair} | {t['iteration_s']:.3f} | {f['iteration_s']:.3f} | {ratio:.2f} | {t['length']:.1f} | "
            f"{f['length']:.1f} |"
        )
    if len(results) == 2:
        a, b = (results[p]["fastprime"]["iteration_s"] for p in PAIRS)
        c, d = (results[p]["trl"]["iteration_s"] for p in PAIRS)
        lines += ["", f"PRIME's extra cost over outcome-only (fastprime): {100 * (b / a - 1):+.0f}% from the run "
                  f"medians, {100 * prime_extra_by_phase(results[list(PAIRS)[1]]['fastprime']):+.0f}% by phase accounting; "
                  f"TRL beta 0.04 over beta 0: {100 * (d / c - 1):+.0f}%."]  # fmt: skip
    lines += ["", "Per-phase medians (s):", ""]
    for pair, r in results.items():
        lines.append(f"- {pair}, TRL: {fmt_phases(r['trl']['phases'])}")
        lines.append(f"- {pair}, fastprime: {fmt_phases(r['fastprime']['phases'])}")
    lines += ["", "Per-run iteration medians (s), in the order run:", ""]
    for pair, r in results.items():
        for side in ("trl", "fastprime"):
            meds = [f"{summarize(side, [run])['iteration_s']:.3f}" for run in r[f"{side}_runs"]]
            lines.append(f"- {pair}, {side}: {', '.join(meds)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vs_trl_cpu.md"))
    ap.add_argument("--trl-worker", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--from-json", nargs=4, default=None, help="raw results file, load before, after, start time"
    )
    args = ap.parse_args()
    if args.trl_worker is not None:
        return trl_worker(args.trl_worker, args.iterations, args.json)
    if (
        args.from_json
    ):  # re-render a finished (or partial) run's raw results: from_json LOAD_BEFORE LOAD_AFTER START
        path, before, after, started = args.from_json
        results = json.loads(pathlib.Path(path).read_text())
        for r in results.values():
            r["trl"], r["fastprime"] = (summarize(s, r[f"{s}_runs"]) for s in ("trl", "fastprime"))
        text = report(results, args, before, after, started)
        pathlib.Path(args.out).write_text(text)
        return print(text)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    load_before = tuple(round(x, 1) for x in os.getloadavg())
    results = {}
    for pair in args.pairs.split(","):
        beta, coef = PAIRS[pair]
        r = results[pair] = {"trl_runs": [], "fastprime_runs": []}
        for i in range(args.runs):
            order = ("trl", "fastprime") if i % 2 == 0 else ("fastprime", "trl")
            for side in order:
                with tempfile.TemporaryDirectory() as tmp:
                    run = (trl_run(beta, args.iterations, pathlib.Path(tmp), env) if side == "trl"
                           else fastprime_run(coef, args.iterations, pathlib.Path(tmp), env))  # fmt: skip
                r[f"{side}_runs"].append(run)
                print(pair, side, i, summarize(side, [run])["iteration_s"], flush=True)
                pathlib.Path(args.out).with_suffix(".json").write_text(json.dumps(results))  # partial, raw
        r["trl"], r["fastprime"] = (
            summarize("trl", r["trl_runs"]),
            summarize("fastprime", r["fastprime_runs"]),
        )
    load_after = tuple(round(x, 1) for x in os.getloadavg())
    text = report(results, args, load_before, load_after, started)
    pathlib.Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
