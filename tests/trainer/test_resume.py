"""Resume after a real crash: `kill -9` of a running `python trainer/main.py` (1 process, or 2 ranks under torchrun
with gloo on CPU), resumed from an older periodic checkpoint than the newest. The resumed run's metrics and
final weights must equal an uninterrupted run's, and metrics.jsonl must hold each step exactly once (the lines
the killed run wrote after the checkpoint are dropped and recomputed).

Two runs: the untrained demo model without the filter, and the scoring model (scoring_model.py) with the filter
on and data whose groups pass in a known pattern (BUFFER_CONFIG), so that a second rollout round passes more
groups than the batch still needs and the surplus prompts wait in the refill buffer: the checkpoint the resume
starts from must hold a non-empty buffer, and the next iteration samples it first, so a resume that lost the
buffer would sample other prompts and differ."""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from hosts import CPU_ONLY_ENV
from scoring_model import scoring_rows

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
prm: {{lr: 1.0e-3, mini_batches: 2, logit_scale_lr: 1.0e-2}}
policy: {{lr: 1.0e-3, mini_batches: 2}}
eval: {{every: 0}}
train: {{iterations: {ITERATIONS}, batch_size: 4, micro_batch_tokens: 96}}
run: {{checkpoint_every: 1, keep_checkpoints: 10, progress: false}}
"""
# The scoring model with the filter on, prompts in file order (no shuffle): the first two have a ground truth the
# model never writes, so their groups always fail; every other prompt is answered right about half the time, so
# its K = 8 group is mixed and passes [0.1, 0.9] with probability ~0.99. Iteration 1's first round thus passes
# two groups, and the second round's four fresh prompts pass where two are needed: two go into the refill buffer.
# Learning rates 1e-4: at 1e-3 the policy unlearns the answer format within 3 iterations.
BUFFER_CONFIG = """
model: {{source: path, path: {model}}}
data: {{source: file, train_path: {data}, max_prompt_tokens: 64, shuffle: false}}
rollout: {{n_samples: 8, max_new_tokens: 12, prompts_per_generate: 8}}
filter: {{enabled: true, lo: 0.1, hi: 0.9, max_rounds: 4}}
verifier: {{workers: 1, timeout_s: 5.0}}
prm: {{lr: 1.0e-4, mini_batches: 2}}
policy: {{lr: 1.0e-4, mini_batches: 2}}
eval: {{every: 0}}
train: {{iterations: {iterations}, batch_size: 4, micro_batch_tokens: 96}}
run: {{checkpoint_every: 1, keep_checkpoints: 10, progress: false}}
"""


def _start(tmp: pathlib.Path, nproc: int, name: str, *extra: str, config: str = CONFIG) -> subprocess.Popen:
    cfg = tmp / "resume.yaml"
    cfg.write_text(config)
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


def _kill_resume_and_compare(tmp_path: pathlib.Path, nproc: int, config: str) -> list[dict]:
    """Uninterrupted run; a second run killed with SIGKILL after step 2 and resumed from step 1's checkpoint.
    Asserts equal metrics (each step once) and final weights; returns the uninterrupted run's metrics."""
    full_proc = _start(tmp_path, nproc, "full", config=config)
    _finish(full_proc)
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in full] == list(range(ITERATIONS + 1))

    part = tmp_path / "part"
    proc = _start(tmp_path, nproc, "part", config=config)
    _kill_after_step(proc, part, 2)  # two iterations early: a loaded machine may poll late
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed (rc {proc.returncode})"
    assert not (part / "hf").exists(), "the run had finished before the kill"
    assert _steps_logged(part)[:3] == [0, 1, 2]

    resume = ("--run.resume", str(part / "checkpoints" / "step_00000001"))
    _finish(_start(tmp_path, nproc, "part", *resume, config=config))
    resumed = read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(ITERATIONS + 1)), "each step exactly once"
    for a, b in zip(full, resumed):
        assert _values(b) == _values(a), f"step {a['step']} differs from the uninterrupted run"
    wa, wb = _weights(tmp_path / "full" / "hf"), _weights(part / "hf")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ from the uninterrupted run"
    return full


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2], ids=["1-process", "torchrun-2-ranks"])
def test_kill_9_then_resume_from_an_older_checkpoint_equals_uninterrupted_run(tmp_path, nproc):
    _kill_resume_and_compare(tmp_path, nproc, CONFIG)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2], ids=["1-process", "torchrun-2-ranks"])
def test_kill_9_then_resume_with_a_non_empty_refill_buffer(tmp_path, nproc, scoring_model):
    """As above with the scoring model and the filter on (BUFFER_CONFIG). The checkpoint the resume starts from
    (step 1) holds prompts in its refill buffer, read from its trainer_state.pt, and step 2 samples them first
    (`filter/from_buffer`); the resumed run must still equal the uninterrupted one."""
    rows = scoring_rows(64)
    for row in rows[:2]:
        row["ground_truth"] = "3"  # never answered: these two groups fail the filter
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = BUFFER_CONFIG.format(model=scoring_model[0], data=data, iterations=ITERATIONS)
    full = _kill_resume_and_compare(tmp_path, nproc, config)
    state = torch.load(
        tmp_path / "part" / "checkpoints" / "step_00000001" / "trainer_state.pt", weights_only=False
    )
    buffered = state["buffer"]["groups"]
    assert buffered, "the refill buffer was empty at the checkpoint the resume started from"
    assert full[1]["filter/buffer_size"] == len(buffered)
    assert full[2]["filter/from_buffer"] == len(buffered)
