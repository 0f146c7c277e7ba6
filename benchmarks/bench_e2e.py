"""End-to-end throughput: a few PRIME iterations of the real trainer, per-phase time and tokens/s, and
PRIME's overhead over outcome-only RLOO (`algorithm.process_coef 0`: no PRM, no reference pass).

prime.md: on the 7B reference run (8xA800) an iteration takes about 680 s, 24% more than outcome-only RLOO.

Run: python -m pytest benchmarks/bench_e2e.py --benchmark-enable -s
Each (model, mode) runs `python trainer/main.py --config configs/bench_e2e.yaml ...` as a subprocess from the
untrained model (no warm start, filter off, so every iteration trains on all B x K responses), reads the
run's metrics.jsonl; the last test prints the table and writes benchmarks/results/e2e_<device>.md on CUDA
(on a CPU only when FASTPRIME_BENCH_MACHINE describes the machine, e.g. "2-core CPU, shared: noisy").
The first iteration is warm-up (verifier pool start, allocator, Triton autotune) and is left out; the table
gives medians over the rest. The random policy stops at EOS after a random number of tokens and the two runs'
policies diverge after the first update, so the overhead is also given per batch token, and as the share of
PRIME's own phases (logprob_ref + prm) within each PRIME iteration, the estimate least exposed to both.

Models (FASTPRIME_BENCH_E2E_MODELS, comma-separated; default `demo` on CPU, both on CUDA):
- `demo`: the demo's tiny Qwen2 (4 layers, hidden 128, ~1M parameters, ~30-token character vocabulary).
- `qwen2.5-0.5b-body`: Qwen2.5-0.5B's decoder shapes (24 layers, hidden 896, 14 query / 2 KV heads, MLP 4864)
  over the demo's vocabulary, so the lm_head is tiny; written as a local HF folder and loaded by path.
FASTPRIME_BENCH_E2E_REPEATS (default 2): runs per mode, PRIME and RLOO alternating.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time

import pytest
import torch
import yaml
from harness import RESULTS_DIR, device_name

from fastprime.trainer.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "bench_e2e.yaml"
WARMUP_ITERATIONS = 1
ON_CUDA = torch.cuda.is_available()

# Loop phases in the order an iteration runs them (trainer/train.py times each as time/<phase>_s).
PHASES = ("rollout", "verify", "filter", "logprob_old", "logprob_ref", "prm", "advantages", "policy", "sync")
PERF_KEYS = ("rollout", "logprob", "prm", "policy")  # perf/<key>_tokens_per_s
MODES = {"prime": [], "rloo": ["--algorithm.process-coef", "0"]}

# Decoder shapes of the larger model (Qwen2.5-0.5B's config.json, vocabulary aside).
QWEN25_05B_BODY = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
)
MODELS = ("demo", "qwen2.5-0.5b-body")
DEFAULT_MODELS = "demo,qwen2.5-0.5b-body" if ON_CUDA else "demo"
SELECTED = [m.strip() for m in os.environ.get("FASTPRIME_BENCH_E2E_MODELS", DEFAULT_MODELS).split(",") if m]

RUNS: dict[tuple[str, str], dict] = {}  # (model, mode) -> {"records": [...], "wall_s": [...]}, over repeats


def write_model_folder(path: pathlib.Path, shape: dict) -> pathlib.Path:
    """A freshly initialised fp32 Qwen2ForCausalLM with decoder `shape` and the demo tokenizer, saved as an HF
    folder that `--model.source path --model.path` loads."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastprime.trainer.demo import build_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, **shape,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def model_args(model: str, tmp: pathlib.Path) -> list[str]:
    if model == "demo":
        return []
    if model == "qwen2.5-0.5b-body":
        folder = tmp / "model"
        if not folder.is_dir():
            write_model_folder(folder, QWEN25_05B_BODY)
        return ["--model.source", "path", "--model.path", str(folder)]
    raise ValueError(f"FASTPRIME_BENCH_E2E_MODELS names unknown model {model!r}; known: {MODELS}")


def run_trainer(args: list[str], run_dir: pathlib.Path) -> None:
    """`python trainer/main.py --config configs/bench_e2e.yaml *args` into run_dir; fails with its output."""
    cmd = [sys.executable, str(REPO / "trainer" / "main.py"), "--config", str(CONFIG), *args]
    cmd += ["--run.output-dir", str(run_dir.parent), "--run.name", run_dir.name]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


REPEATS = int(os.environ.get("FASTPRIME_BENCH_E2E_REPEATS", "2"))
# PRIME and RLOO runs alternate, so that a slow spell of a shared machine does not land on one mode only.
CASES = [(model, rep, mode) for model in MODELS for rep in range(REPEATS) for mode in MODES]


@pytest.mark.parametrize(("model", "rep", "mode"), CASES, ids=[f"{m}-{o}-{r}" for m, r, o in CASES])
def test_e2e_run(benchmark, tmp_path_factory, model: str, rep: int, mode: str):
    """One trainer run; its wall time (startup and final checkpoint included) goes to pytest-benchmark."""
    if model not in SELECTED:
        pytest.skip(f"{model} not in FASTPRIME_BENCH_E2E_MODELS={','.join(SELECTED)}")
    tmp = tmp_path_factory.getbasetemp() / f"e2e_{model}"
    tmp.mkdir(exist_ok=True)
    args = model_args(model, tmp) + MODES[mode]
    run_dir = tmp / f"{mode}_{rep}"
    t0 = time.perf_counter()
    benchmark.pedantic(run_trainer, args=(args, run_dir), rounds=1, iterations=1)
    wall = time.perf_counter() - t0
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > WARMUP_ITERATIONS]
    assert records, f"{run_dir}: no iteration after the {WARMUP_ITERATIONS} warm-up one(s)"
    skipped = [r["step"] for r in records if r.get("filter/skipped_update")]
    assert not skipped, f"iterations {skipped} trained on nothing: the timings would not be an iteration's"
    run = RUNS.setdefault((model, mode), {"records": [], "wall_s": []})
    run["records"] += records
    run["wall_s"].append(wall)
    benchmark.extra_info.update(model=model, mode=mode, iteration_s=median(records, "time/iteration_s"))


def median(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def loop_seconds(r: dict) -> float:
    """An iteration's time without the evaluation and checkpoint that only some iterations do."""
    return r["time/iteration_s"] - r.get("time/eval_s", 0.0) - r.get("time/checkpoint_s", 0.0)


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def fastest(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return min(values) if values else None


def model_table(model: str) -> list[str]:
    """Markdown lines for one model: per-phase seconds, tokens/s, and PRIME's overhead over RLOO.

    Medians and minima are over all measured iterations of all repeats; on a shared machine the minimum is the
    least disturbed estimate of a phase's own cost."""
    prime, rloo = RUNS[(model, "prime")]["records"], RUNS[(model, "rloo")]["records"]
    n_runs = len(RUNS[(model, "prime")]["wall_s"])
    lines = [
        f"### {model}: {len(prime)} PRIME and {len(rloo)} RLOO iterations ({n_runs} run(s) each, "
        f"iteration 1 of each run left out as warm-up)",
        "",
        "| phase (s/iteration) | PRIME median | PRIME min | RLOO median | RLOO min | median PRIME - RLOO |",
        "|---|---|---|---|---|---|",
    ]
    for phase in PHASES:
        key = f"time/{phase}_s"
        p, o = median(prime, key), median(rloo, key)
        diff = (p or 0.0) - (o or 0.0) if (p is not None or o is not None) else None
        lines.append(
            f"| {phase} | {_f(p, '.3f')} | {_f(fastest(prime, key), '.3f')} | {_f(o, '.3f')} "
            f"| {_f(fastest(rloo, key), '.3f')} | {_f(diff, '+.3f')} |"
        )
    p_loop, o_loop = [loop_seconds(r) for r in prime], [loop_seconds(r) for r in rloo]
    p_it, o_it = statistics.median(p_loop), statistics.median(o_loop)
    lines.append(
        f"| **iteration** (no eval/checkpoint) | {p_it:.3f} | {min(p_loop):.3f} | {o_it:.3f} | {min(o_loop):.3f} "
        f"| {p_it - o_it:+.3f} |"
    )
    lines += ["", "| tokens/s | PRIME median | RLOO median |", "|---|---|---|"]
    for key in PERF_KEYS:
        k = f"perf/{key}_tokens_per_s"
        lines.append(f"| {k} | {_f(median(prime, k), '.0f')} | {_f(median(rloo, k), '.0f')} |")
    per_tok = {
        name: sum(map(loop_seconds, recs)) / sum(r["batch/tokens"] for r in recs)
        for name, recs in (("prime", prime), ("rloo", rloo))
    }
    lines.append(
        f"| iteration (all batch tokens / all loop time) | {1 / per_tok['prime']:.0f} | {1 / per_tok['rloo']:.0f} |"
    )
    for key, label in (
        ("batch/tokens", "batch tokens / iteration (prompt + response)"),
        ("rollout/tokens", "response tokens / iteration"),
    ):
        lines.append(f"| {label} | {_f(median(prime, key), '.0f')} | {_f(median(rloo, key), '.0f')} |")
    wall = {m: statistics.median(RUNS[(model, m)]["wall_s"]) for m in MODES}
    lines.append(
        f"| whole run wall s (startup, warm-up, checkpoint; median) | {wall['prime']:.1f} | {wall['rloo']:.1f} |"
    )
    # PRIME's own extra work is the reference pass and the PRM forward/backward/update (process_coef 0 skips
    # exactly these). Comparing them with the rest of the same iteration (same tokens, same moment of a
    # shared machine) is the least noisy estimate of the overhead.
    added = [r.get("time/logprob_ref_s", 0.0) + r.get("time/prm_s", 0.0) for r in prime]
    within = statistics.median(a / (loop_seconds(r) - a) for a, r in zip(added, prime))
    lines += [
        "",
        "PRIME over outcome-only RLOO (prime.md's 7B reference run: +24%); the first three compare separate runs,"
        " so they carry the machine's noise and the runs' different response lengths:",
        f"- median iteration time, PRIME runs vs RLOO runs: {100 * (p_it / o_it - 1):+.0f}%",
        f"- fastest iteration: {100 * (min(p_loop) / min(o_loop) - 1):+.0f}%",
        f"- time per batch token (all measured iterations): {100 * (per_tok['prime'] / per_tok['rloo'] - 1):+.0f}%",
        f"- within each PRIME iteration, logprob_ref + prm over the other phases (median): **{100 * within:+.0f}%**",
        f"- median logprob_ref + prm ({statistics.median(added):.3f} s) over RLOO's median iteration: "
        f"{100 * statistics.median(added) / o_it:+.0f}%",
    ]
    return lines


def machine() -> str:
    if ON_CUDA:
        return device_name()
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        platform.processor() or "unknown CPU",
    ) if pathlib.Path("/proc/cpuinfo").exists() else (platform.processor() or "unknown CPU")  # fmt: skip
    return f"cpu ({cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})"


def config_summary() -> str:
    c = yaml.safe_load(CONFIG.read_text())
    t, r = c["train"], c["rollout"]
    return (
        f"B={t['batch_size']} prompts x K={r['n_samples']}, <= {r['max_new_tokens']} new tokens, "
        f"{t['iterations']} iterations, {c['policy']['mini_batches']} policy / {c['prm']['mini_batches']} PRM mini-batches"
    )


def test_e2e_report():
    """Writes results/e2e_<device>.md from the runs above (models with both modes) and prints it."""
    models = [m for m in MODELS if (m, "prime") in RUNS and (m, "rloo") in RUNS]
    if not models:
        pytest.skip("no model ran in both modes")
    impl = os.environ.get("FASTPRIME_KERNEL_IMPL") or ("triton" if ON_CUDA else "chunked")
    lines = [
        "# End-to-end PRIME throughput (benchmarks/bench_e2e.py)",
        "",
        f"device: {machine()}",
    ]
    if os.environ.get("FASTPRIME_BENCH_MACHINE"):
        lines.append(f"machine: {os.environ['FASTPRIME_BENCH_MACHINE']}")
    lines += [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"fused-head impl {impl}; {'bf16 compute' if ON_CUDA else 'fp32'}",
        f"config: configs/bench_e2e.yaml: {config_summary()}; no warm start, filter off (all B x K responses "
        "train every iteration); RLOO = the same with --algorithm.process-coef 0",
        "",
    ]
    for m in models:
        lines += [*model_table(m), ""]
    text = "\n".join(lines)
    print("\n" + text)
    # As for the kernel benchmarks, a CPU run only prints unless the machine is described: numbers from an
    # anonymous shared CPU would silently replace the kept ones.
    if not (ON_CUDA or os.environ.get("FASTPRIME_BENCH_MACHINE")):
        return
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device_name()).strip("_")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"e2e_{slug}.md").write_text(text + "\n")
    print(f"wrote {RESULTS_DIR / f'e2e_{slug}.md'}")
