"""The launcher (main.py) as a user runs it: config and data errors come back as one readable line."""

import json
import os
import pathlib
import subprocess
import sys

from hosts import CPU_ONLY_ENV

REPO = pathlib.Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **CPU_ONLY_ENV, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(REPO / "trainer" / "main.py"), *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env=env,
    )


def test_cli_config_error_is_one_readable_line(tmp_path):
    proc = _cli("--filter.lo", "0.9", "--filter.hi", "0.1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "filter.lo=0.9, filter.hi=0.1" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_cli_malformed_row_names_file_and_row(tmp_path):
    data = tmp_path / "train.jsonl"
    good = {
        "prompt": [{"role": "user", "content": "1+1="}],
        "reward_model": {"ground_truth": "2"},
        "ability": "math",
    }
    data.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")
    proc = _cli(
        "--data.source",
        "file",
        "--data.train-path",
        str(data),
        "--run.output-dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert f"{data}: row 1: missing the answer" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
