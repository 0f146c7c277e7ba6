"""FSDP2 under real `torchrun --nproc_per_node 2` (gloo, CPU) equals one process on the same global batch.

The two-process run also uses a small token budget (several micro-batches per mini-batch), the one-process
run a budget that fits each mini-batch in one pass, so this also checks that micro-batch accumulation with
global normalisers gives the gradients of one big batch.
"""

import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch
from hosts import CPU_ONLY_ENV

from fastprime.trainer.demo import build_tiny_model, build_tokenizer

WORKER = pathlib.Path(__file__).with_name("fsdp_worker.py")


def _torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = {**os.environ, **CPU_ONLY_ENV, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # A session of its own, so that a hang kills torchrun and its workers together.
    proc = subprocess.Popen(
        [*cmd, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun with {nproc} processes did not finish in 240 s")
    assert proc.returncode == 0, f"torchrun with {nproc} processes failed:\n{stderr[-4000:]}"


def _run(tmp_path, nproc: int, budget: int) -> dict:
    out = tmp_path / f"out_{nproc}.pt"
    _torchrun(nproc, str(WORKER), str(out), str(budget))
    return torch.load(out)


@pytest.mark.slow
def test_fsdp2_two_ranks_equal_one_process(tmp_path):
    one = _run(tmp_path, 1, budget=4096)
    two = _run(tmp_path, 2, budget=40)
    for key in ("old_logp", "ref_logp", "q"):
        torch.testing.assert_close(
            two[key], one[key], atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}"
        )
    for key in ("prm_loss", "policy_loss", "prm_grad_norm", "policy_grad_norm"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), (
            f"{key}: 2 ranks {two[key]} vs 1 rank {one[key]}"
        )
    start = build_tiny_model(build_tokenizer(), seed=0).state_dict()
    # the PRM's logit scale (prm.logit_scale_lr), sharded over 2 ranks as a root parameter of one element
    assert abs(float(one["prm"]["logit_scale"]) - 1.0) > 1e-4
    for model in ("policy", "prm"):
        assert one[model].keys() == two[model].keys()
        moved = max(float((one[model][k] - start[k]).abs().max()) for k in start)
        assert moved > 1e-4, f"{model} did not change (max change {moved})"
        for k in one[model]:
            torch.testing.assert_close(
                two[model][k],
                one[model][k],
                atol=2e-6,
                rtol=1e-5,
                msg=lambda m, k=k, model=model: f"{model}.{k}: {m}",
            )


@pytest.mark.slow
def test_main_runs_under_torchrun_two_ranks(tmp_path):
    """The whole loop with 2 ranks: prompts split over ranks for rollout, results gathered, one checkpoint."""
    from fastprime.trainer.metrics import read_metrics

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "model: {source: demo}\nwarmstart: {enabled: false}\n"
        "data: {source: demo, demo_train_rows: 32, demo_eval_rows: 4, max_prompt_tokens: 64}\n"
        "rollout: {n_samples: 4, max_new_tokens: 8}\nfilter: {enabled: false}\nverifier: {workers: 1}\n"
        "prm: {mini_batches: 2}\npolicy: {mini_batches: 2}\n"
        "train: {iterations: 2, batch_size: 3, micro_batch_tokens: 72}\neval: {every: 0, max_new_tokens: 8}\n"
        "run: {progress: false}\n"
    )
    main = pathlib.Path(__file__).resolve().parents[2] / "trainer" / "main.py"
    _torchrun(2, str(main), "--config", str(cfg), "--run.output-dir", str(tmp_path), "--run.name", "ddp")
    records = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(r["rollout/responses"] == 12 and r["batch/responses"] == 12 for r in records[1:])
    assert (
        records[2]["eval/acc"] is not None and (tmp_path / "ddp" / "checkpoints" / "step_00000002").is_dir()
    )
