"""The demo run with a frozen PRM equal to the reference and 4 PRM mini-batches gives exactly zero process
rewards every iteration (issue 9 item 3; a separate module: main() needs its own process group)."""

from fastprime.trainer.main import main
from fastprime.trainer.metrics import read_metrics

TINY = """
model: {source: demo}
warmstart: {enabled: false}
data: {source: demo, demo_train_rows: 32, demo_eval_rows: 0, max_prompt_tokens: 64}
rollout: {n_samples: 4, max_new_tokens: 12, prompts_per_generate: 8}
filter: {enabled: false}
verifier: {workers: 1, timeout_s: 5.0}
policy: {mini_batches: 2}
eval: {every: 0}
train: {iterations: 2, batch_size: 4, micro_batch_tokens: 160}
run: {checkpoint_every: 0, progress: false, export_hf: false}
"""


def test_cli_frozen_prm_with_four_mini_batches_gives_zero_process_rewards(tmp_path):
    """As a user tries it: `--prm.update none --prm.mini-batches 4` on the demo, every iteration."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    argv = ["--config", str(cfg), "--run.output-dir", str(tmp_path), "--run.name", "r"]
    assert main([*argv, "--prm.update", "none", "--prm.mini-batches", "4"]) == 0
    for rec in read_metrics(tmp_path / "r" / "metrics.jsonl")[1:]:
        got = {k: rec[k] for k in ("process/token_mean", "process/seq_sum_mean", "returns/process_mean")}
        assert all(v == 0.0 for v in got.values()), (rec["step"], got)
