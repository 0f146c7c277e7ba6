"""Resume after a real crash: `kill -9` of a running `python trainer/main.py` (1 process, or 2 ranks under torchrun
with gloo on CPU), resumed from an older periodic checkpoint than the newest. The resumed run's metrics and
final weights must equal an uninterrupted run's, and metrics.jsonl must hold each step exactly once (the lines
the killed run wrote after the checkpoint are dropped and recomputed).

Not covered yet: the refill buffer. A round samples exactly batch_size prompts, so surplus groups need a model
whose groups pass the filter only sometimes (an untrained model scores 0 everywhere: all pass or none do)."""

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from hosts import CPU_ONLY_ENV

from fastprime.trainer.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]
ITERATIONS = 4
CONFIG = f"""
model: {{source: demo}}
warmstart: {{enabled: false}}
data: {{source: demo, demo_train_rows: 64, demo_eval_rows: 0, max_prompt_tokens: 64}}
rollout: {{n_samples: 2, max_new_tokens: 8, prompts_per_generate: 8}}
filter: {{enabled: false}}
verifier: {{workers: 1, timeout_s: 5.0}}
prm: {{lr: 1.0e-3, mini_batches: 2}}
policy: {{lr: 1.0e-3, mini_batches: 2}}
eval: {{every: 0}}
train: {{iterations: {ITERATIONS}, batch_size: 4, micro_batch_tokens: 96}}
run: {{checkpoint_every: 1, keep_checkpoints: 10, progress: false}}
"""


def _start(tmp: pathlib.Path, nproc: int, name: str, *extra: str) -> subprocess.Popen:
    cfg = tmp / "resume.yaml"
    cfg.write_text(CONFIG)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*launcher, str(REPO / "trainer" / "main.py"), "--config", str(cfg), "--run.output-dir", str(tmp)]
    env = {**os.environ, **CPU_ONLY_ENV, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # A session of its own, so that a hang cannot outlive the test (_kill_9 also reaches torchrun's workers).
    return subprocess.Popen(
        [*cmd, "--run.name", name, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        cwd=tmp, start_new_session=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 400) -> None:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"run did not finish in {timeout} s")
    assert proc.returncode == 0, err[-4000:]


def _steps_logged(run: pathlib.Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    complete = lines if path.read_text().endswith("\n") else lines[:-1]
    return [int(ln.split('"step": ')[1].split(",")[0].split("}")[0]) for ln in complete if '"step": ' in ln]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc): torchrun's workers run in process groups of their own."""
    children: dict[int, list[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_9(proc: subprocess.Popen) -> None:
    """kill -9 of the launched process and every process it started, all at one moment."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signal.SIGKILL)
    proc.communicate()


def _kill_after_step(proc: subprocess.Popen, run: pathlib.Path, step: int, timeout: float = 400) -> None:
    """SIGKILL the whole process group as soon as `step`'s metrics line and checkpoint exist."""
    deadline = time.monotonic() + timeout
    ckpt = run / "checkpoints" / f"step_{step:08d}" / "trainer_state.pt"
    while time.monotonic() < deadline and proc.poll() is None:
        if step in _steps_logged(run) and ckpt.is_file():
            _kill_9(proc)
            return
        time.sleep(0.05)
    err = proc.communicate()[1] if proc.poll() is not None else ""
    os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    pytest.fail(
        f"the run ended (rc {proc.returncode}) or stalled before step {step} could be killed: {err[-2000:]}"
    )


def _values(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/"))}


def _weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2], ids=["1-process", "torchrun-2-ranks"])
def test_kill_9_then_resume_from_an_older_checkpoint_equals_uninterrupted_run(tmp_path, nproc):
    full_proc = _start(tmp_path, nproc, "full")
    _finish(full_proc)
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in full] == list(range(ITERATIONS + 1))

    part = tmp_path / "part"
    proc = _start(tmp_path, nproc, "part")
    _kill_after_step(proc, part, 2)  # two iterations early: a loaded machine may poll late
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed (rc {proc.returncode})"
    assert not (part / "hf").exists(), "the run had finished before the kill"
    assert _steps_logged(part)[:3] == [0, 1, 2]

    _finish(_start(tmp_path, nproc, "part", "--run.resume", str(part / "checkpoints" / "step_00000001")))
    resumed = read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(ITERATIONS + 1)), "each step exactly once"
    for a, b in zip(full, resumed):
        assert _values(b) == _values(a), f"step {a['step']} differs from the uninterrupted run"
    wa, wb = _weights(tmp_path / "full" / "hf"), _weights(part / "hf")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ from the uninterrupted run"
