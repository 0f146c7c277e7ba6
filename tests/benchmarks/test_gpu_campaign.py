"""The GPU campaign's logic on a CPU: its plan names benchmark cases that exist, a dry run runs nothing, a real
run of a (CPU-sized) step leaves its tables and log in the output folder, and the summary computes the ratios
to eager and to liger and the share of peak from sample tables."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import campaign  # noqa: E402
import harness  # noqa: E402


def collected_benchmarks() -> set[str]:
    files = sorted({arg.split("::")[0] for step in campaign.plan() for arg in step.args if "::" in arg})
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    return {line.strip() for line in run.stdout.splitlines() if "::" in line}


def test_every_planned_case_exists():
    """A typo in a node id would make pytest error out on the GPU machine, wasting its minutes."""
    planned = [arg for step in campaign.plan() for arg in step.args if "::" in arg]
    assert len(planned) == 23
    missing = sorted(set(planned) - collected_benchmarks())
    assert missing == []


def test_plan_covers_the_decisive_cases():
    cases = " ".join(arg for step in campaign.plan() for arg in step.args)
    for method in ("eager", "chunked", "triton", "liger"):
        for mode in ("fwd", "fwd+bwd"):
            assert f"N16384-D3584-V152064-bfloat16-{method}-{mode}]" in cases
    for n in (8192, 16384, 32768):
        assert f"N{n}-D3584-V152064-bfloat16-triton-fwd+bwd]" in cases
    assert "D896-V151936" in cases and "test_bench_ppo_fwd_bwd" in cases and "test_bench_prm_fwd_bwd" in cases
    assert campaign.plan()[0].args[:4] == ["-q", "-rs", "-m", "gpu"]
    assert sum(step.timeout_s for step in campaign.plan()) > 480, (
        "the budget, not the step timeouts, must bind"
    )


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_campaign.sh"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    steps = [line for line in run.stdout.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == [step.name for step in campaign.plan()]
    assert "head_7b_n16384" in run.stdout and not out.exists()


def test_step_writes_its_table_and_log_into_the_output_folder(tmp_path):
    """A real pytest subprocess, as on the GPU machine, on the CPU shape of one benchmark case."""
    step = campaign.Step(
        "cpu_case",
        [
            "benchmarks/bench_linear_logprobs.py::test_linear_logprobs[N256-D128-V8192-float32-eager-fwd]",
            "--benchmark-enable", "-q", "-p", "no:cacheprovider",
        ],
        120,
    )  # fmt: skip
    status = campaign.run_step(step, tmp_path, seconds_left=300)
    assert status.startswith("cpu_case: rc=0"), status + (tmp_path / "cpu_case.log").read_text()[-2000:]
    (csv,) = tmp_path.glob("linear_logprobs_cpu_case_*.csv")
    (row,) = harness.read_rows(csv)
    assert (row.method, row.mode, row.shape) == ("eager", "fwd", "N=256 D=128 V=8192") and row.ms > 0
    assert campaign.run_step(step, tmp_path, seconds_left=5).endswith("5 s of the budget left")


def test_summary_from_sample_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPRIME_BENCH_TAG", "sample")
    shape = "N=16384 D=3584 V=152064"
    flops = 6 * 16384 * 3584 * 152064
    row = lambda method, ms: harness.Row(
        "linear_logprobs",
        shape,
        "bfloat16",
        method,
        "fwd+bwd",
        ms,
        flops / ms / 1e9,
        flops / ms / 1e7 / 989,
        1.0,
    )
    rows = [row("eager", 200.0), row("liger", 150.0), row("triton", 100.0)]
    rows.append(harness.Row("linear_logprobs", shape, "bfloat16", "chunked", "fwd+bwd", *[None] * 4, "OOM"))
    harness.write_tables(rows, tmp_path, "NVIDIA H200")
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_campaign.sh"), "--summarize", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    # op, shape (3 words), mode, method, then: ms, ms per 1k tokens, % peak, x eager, x liger
    lines = {line.split()[5]: line.split()[6:] for line in run.stdout.splitlines()[1:]}
    assert lines["triton"] == ["100.00", "6.104", "54.2", "2.00", "1.50"]
    assert lines["liger"] == ["150.00", "9.155", "36.1", "1.33", "1.00"]
    assert lines["eager"] == ["200.00", "12.207", "27.1", "1.00", "0.75"]
    assert lines["chunked"] == ["OOM", "-", "-", "-", "-"]


@pytest.mark.parametrize("argv", [["--budget-s", "x"], ["--nope"]])
def test_bad_arguments_fail_with_a_message(argv):
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_campaign.sh"), *argv], capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2 and "error" in run.stderr
