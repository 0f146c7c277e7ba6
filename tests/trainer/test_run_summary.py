"""The end-of-run line says what the first held-out accuracy measured: after the warm start, or before RL."""

import pytest

from fastprime.trainer.main import main

TINY = """
model: {source: demo}
data: {source: demo, demo_train_rows: 32, demo_eval_rows: 4, max_prompt_tokens: 64}
rollout: {n_samples: 2, max_new_tokens: 6, prompts_per_generate: 8}
filter: {enabled: false}
verifier: {workers: 1, timeout_s: 5.0}
prm: {mini_batches: 1}
policy: {mini_batches: 1}
warmstart: {lr: 1.0e-3, warmup_steps: 1, batch_size: 8, max_steps: 1, eval_every: 1, max_new_tokens: 6, eval_batch_size: 4}
eval: {every: 0, max_new_tokens: 6, batch_size: 4}
train: {iterations: 1, batch_size: 2, micro_batch_tokens: 160}
run: {checkpoint_every: 0, progress: false, export_hf: false}
"""


@pytest.mark.parametrize("warm, said", [(False, "before RL"), (True, "after the warm start")])
def test_summary_names_what_the_first_accuracy_measured(tmp_path, capsys, warm, said):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    flag = "--warmstart.enabled" if warm else "--warmstart.no-enabled"
    assert main(["--config", str(cfg), "--run.output-dir", str(tmp_path), "--run.name", "r", flag]) == 0
    line = next(
        ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("held-out greedy accuracy")
    )
    other = "after the warm start" if not warm else "before RL"
    assert said in line and other not in line, line


def test_finished_run_without_evaluation_does_not_say_stopped(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.replace("demo_eval_rows: 4", "demo_eval_rows: 0"))
    assert (
        main(
            [
                "--config",
                str(cfg),
                "--run.output-dir",
                str(tmp_path),
                "--run.name",
                "r",
                "--warmstart.no-enabled",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "finished all 1 iterations (no held-out evaluation at the end)" in out and "stopped at" not in out
    ), out
