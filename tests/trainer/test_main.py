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


BAD_VALUES = [
    ("--policy.clip-low", "1.5", "policy.clip_low"),
    ("--algorithm.gamma", "1.5", "algorithm.gamma"),
    ("--policy.kl-coef", "-1", "policy.kl_coef"),
    ("--policy.entropy-coef", "-0.1", "policy.entropy_coef"),
    ("--prm.lr", "inf", "prm.lr"),
    ("--algorithm.outcome-coef", "-1", "algorithm.outcome_coef"),
    ("--model.attn-implementation", "flash", "model.attn_implementation"),
    ("--eval.batch-size", "0", "eval.batch_size"),
    ("--warmstart.max-seconds", "0", "warmstart.max_seconds"),
    ("--train.seed", "-3", "train.seed"),
]


def test_cli_values_that_cannot_work_stop_at_start_naming_the_key(tmp_path):
    """Each bad value exits 2 with one line naming its key (one subprocess for the CLI path, main() for the rest)."""
    import contextlib
    import io

    from fastprime.trainer.main import main

    flag, value, key = BAD_VALUES[0]
    proc = _cli(flag, value, "--run.output-dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for flag, value, key in BAD_VALUES[1:]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main([flag, value, "--run.output-dir", str(tmp_path)])
        assert rc == 2 and key in err.getvalue(), (flag, value, err.getvalue())
        assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
