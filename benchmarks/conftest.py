"""Wires the benchmark harness (harness.py) into pytest: collects bench_*.py, provides the `measure` fixture,
prints the table at the end and writes it where `harness.output_dir()` says.

Run: python -m pytest benchmarks/ --benchmark-enable   (the default test run never collects this folder).
"""

from __future__ import annotations

import harness
import pytest


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


@pytest.fixture
def measure(benchmark):
    return harness.measurer(benchmark)


def pytest_terminal_summary(terminalreporter):
    if not harness.ROWS:
        return
    device = harness.device_name()
    terminalreporter.write_sep("=", "fastprime kernel benchmarks")
    for line in [f"device: {device}", *harness.table(harness.ROWS)]:
        terminalreporter.write_line(line)
    out_dir = harness.output_dir()
    if out_dir is not None:
        for path in harness.write_tables(harness.ROWS, out_dir, device):
            terminalreporter.write_line(f"wrote {path}")
