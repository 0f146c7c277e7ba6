"""The kernel benchmarks' harness: time a call, record TFLOP/s and peak extra memory as a `Row`, render and
write the result tables. conftest.py only wires it into pytest (the `measure` fixture, the end-of-run table).

Tables go to $FASTPRIME_BENCH_OUT (the GPU campaign sets it) or, on a GPU, to benchmarks/results/; the file
name is `<op>[_<$FASTPRIME_BENCH_TAG>]_<device>.md` and `.csv`, so that several runs do not overwrite each other.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"

# Dense bf16/fp16 tensor-core peak (no sparsity), TFLOP/s, by a substring of the device name.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}
# This project's implementations: a failure of one of these fails the benchmark instead of skipping it.
OWN_METHODS = ("reference", "chunked", "triton")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_tflops(name: str | None = None) -> float | None:
    name = device_name() if name is None else name
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


def measurer(benchmark):
    """The `measure` fixture's function: measure(fn, op=, shape=, dtype=, method=, mode=, flops=) warms fn
    up once (compile, autotune), then records its peak extra memory (less exclude_bytes) and median time
    (synchronised) as a Row; OOM gives an "OOM" row and a skip, any other failure of a third-party method
    (compile, liger, cce) a skip naming it, and of this project's own methods an error."""

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


def table(rows: list[Row]) -> list[str]:
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


def output_dir() -> Path | None:
    """Where tables are written: $FASTPRIME_BENCH_OUT, else benchmarks/results/ on a GPU, else nowhere."""
    if out := os.environ.get("FASTPRIME_BENCH_OUT"):
        return Path(out)
    return RESULTS_DIR if torch.cuda.is_available() else None


def write_tables(rows: list[Row], out_dir: Path, device: str) -> list[Path]:
    """One .md and one .csv per op under out_dir; returns the .md paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")
    tag = os.environ.get("FASTPRIME_BENCH_TAG", "")
    written = []
    for op in sorted({r.op for r in rows}):
        op_rows = [r for r in rows if r.op == op]
        stem = "_".join(part for part in (op, tag, slug) if part)
        md = out_dir / f"{stem}.md"
        md.write_text("\n".join([f"device: {device}", "", *table(op_rows)]) + "\n")
        with open(out_dir / f"{stem}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([field.name for field in fields(Row)])
            writer.writerows(astuple(r) for r in op_rows)
        written.append(md)
    return written


def read_rows(path: Path) -> list[Row]:
    """The rows of a .csv written by `write_tables` (empty cells -> None)."""
    numeric = {"ms", "tflops", "pct_peak", "peak_mem_mib"}
    with open(path, newline="") as f:
        return [
            Row(
                **{
                    k: (float(v) if v not in ("", "None") else None) if k in numeric else v
                    for k, v in rec.items()
                }
            )
            for rec in csv.DictReader(f)
        ]
