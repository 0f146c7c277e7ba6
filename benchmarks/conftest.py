"""Shared benchmark harness: collects bench_*.py, times with pytest-benchmark, records TFLOP/s and peak memory.

Run: python -m pytest benchmarks/ --benchmark-enable   (the default test run never collects this folder).
Each benchmark calls `measure(...)`; at the end of the session a table is printed, and on a GPU it is also
written to benchmarks/results/<op>_<device>.md and .csv.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"

# Dense bf16/fp16 tensor-core peak (no sparsity), TFLOP/s, by a substring of the device name.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def pytest_collect_file(file_path, parent):
    # Benchmarks are named bench_*.py so that a plain pytest run never mistakes them for tests.
    # Files named on the command line are collected by pytest itself; collecting them here too would run
    # every benchmark twice.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def peak_tflops() -> float | None:
    name = device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    method: str
    mode: str
    ms: float | None
    tflops: float | None
    pct_peak: float | None
    peak_mem_mib: float | None
    note: str = ""


ROWS: list[Row] = []
# This project's implementations: a failure of one of these fails the benchmark instead of skipping it.
OWN_METHODS = ("reference", "chunked", "triton")


def peak_extra_memory(fn: Callable[[], object], exclude_bytes: int = 0) -> float | None:
    """MiB allocated at peak during one call beyond what was allocated before it and beyond
    `exclude_bytes` (e.g. the gradients the call must produce); CUDA only."""
    if not torch.cuda.is_available():
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - before - exclude_bytes) / 2**20


@pytest.fixture
def measure(benchmark):
    """measure(fn, op=, shape=, dtype=, method=, mode=, flops=) warms fn up once (compile, autotune), then
    records its peak extra memory (less exclude_bytes) and median time (synchronised) as a Row; OOM gives an
    "OOM" row and a skip, any other failure of a third-party method (compile, liger, cce) a skip naming it,
    and of this project's own methods an error."""

    def run(
        fn, *, op: str, shape: str, dtype: str, method: str, mode: str, flops: float, rounds: int = 5,
        exclude_bytes: int = 0,
    ):  # fmt: skip
        def timed():
            out = fn()
            sync()
            return out

        try:
            fn()  # compile / autotune outside the timed rounds and the memory measurement
            mem = peak_extra_memory(fn, exclude_bytes)
            benchmark.extra_info.update(op=op, shape=shape, dtype=dtype, method=method, mode=mode)
            benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            ROWS.append(Row(op, shape, dtype, method, mode, None, None, None, None, "OOM"))
            pytest.skip(f"{method} {mode} {shape}: out of memory")
        except Exception as err:  # torch.compile without a working C++ toolchain, a missing kernel, ...
            if method in OWN_METHODS:
                raise  # a failure of this project's own kernels is a bug to see, not a skip
            pytest.skip(f"{method} does not run here: {type(err).__name__}: {str(err)[:300]}")
        stats = getattr(benchmark, "stats", None)
        ms = stats.stats.median * 1e3 if stats is not None else None
        tflops = flops / (ms * 1e-3) / 1e12 if ms else None
        peak = peak_tflops()
        pct = 100 * tflops / peak if (tflops and peak) else None
        benchmark.extra_info.update(ms=ms, tflops=tflops, pct_peak=pct, peak_mem_mib=mem)
        ROWS.append(Row(op, shape, dtype, method, mode, ms, tflops, pct, mem))

    return run


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _table(rows: list[Row]) -> list[str]:
    """Markdown lines; speedup and memory are relative to the eager reference of the same shape and mode."""
    eager = {(r.op, r.shape, r.dtype, r.mode): r for r in rows if r.method == "eager"}
    lines = [
        "| op | shape | dtype | mode | method | ms | TFLOP/s | % peak | peak extra MiB | speedup vs eager | mem vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = eager.get((r.op, r.shape, r.dtype, r.mode))
        speed = e.ms / r.ms if (e and e.ms and r.ms) else None
        mem = (
            r.peak_mem_mib / e.peak_mem_mib if (e and e.peak_mem_mib and r.peak_mem_mib is not None) else None
        )
        lines.append(
            f"| {r.op} | {r.shape} | {r.dtype} | {r.mode} | {r.method} | {_fmt(r.ms, '.2f')}{' ' + r.note if r.note else ''} "
            f"| {_fmt(r.tflops, '.3g')} | {_fmt(r.pct_peak, '.1f')} | {_fmt(r.peak_mem_mib, '.0f')} "
            f"| {_fmt(speed, '.2f')} | {_fmt(mem, '.4f')} |"
        )
    return lines


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    lines = [f"device: {device_name()}", *_table(ROWS)]
    terminalreporter.write_sep("=", "fastprime kernel benchmarks")
    for line in lines:
        terminalreporter.write_line(line)
    if not torch.cuda.is_available():
        return
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device_name()).strip("_")
    RESULTS_DIR.mkdir(exist_ok=True)
    for op in sorted({r.op for r in ROWS}):
        rows = [r for r in ROWS if r.op == op]
        (RESULTS_DIR / f"{op}_{slug}.md").write_text(
            "\n".join([f"device: {device_name()}", "", *_table(rows)]) + "\n"
        )
        with open(RESULTS_DIR / f"{op}_{slug}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(list(Row.__dataclass_fields__))
            writer.writerows([list(vars(r).values()) for r in rows])
        terminalreporter.write_line(f"wrote {RESULTS_DIR / f'{op}_{slug}.md'}")
