"""A PRM that diverges (non-finite q, so non-finite rewards) costs a counted, logged, skipped update, and the
run goes on (issue 9 item 6). The real run: setup, then iterations, with the PRM's weights made NaN."""

import math

import torch

from fastprime.trainer.config import load_config
from fastprime.trainer.metrics import read_metrics
from fastprime.trainer.models import full_state_dict
from fastprime.trainer.passes import Dist
from fastprime.trainer.train import finish, iteration, setup
from fastprime.trainer.verifiers import VerifierPool

TINY = """
model: {source: demo}
warmstart: {enabled: false}
data: {source: demo, demo_train_rows: 32, demo_eval_rows: 0, max_prompt_tokens: 64}
rollout: {n_samples: 4, max_new_tokens: 8, prompts_per_generate: 8}
filter: {enabled: false}
verifier: {workers: 1, timeout_s: 5.0}
prm: {mini_batches: 2, update: none}
policy: {lr: 1.0e-3, mini_batches: 2}
eval: {every: 0}
train: {iterations: 2, batch_size: 2, micro_batch_tokens: 160}
run: {checkpoint_every: 0, progress: false, export_hf: false}
"""


def test_non_finite_prm_rewards_skip_the_update_and_the_run_goes_on(tmp_path, group_of_one, capsys):
    (tmp_path / "tiny.yaml").write_text(TINY)
    cfg = load_config(["--config", str(tmp_path / "tiny.yaml"), "--run.output-dir", str(tmp_path)])
    d = Dist(rank=0, world=1, device=group_of_one.device, token_budget=cfg.train.micro_batch_tokens)
    with VerifierPool(workers=1, timeout_s=5.0) as pool:
        t = setup(cfg, d, pool)
        with torch.no_grad():
            for p in t.prm.parameters():
                p.fill_(float("nan"))
        before = {k: v.clone() for k, v in full_state_dict(t.policy).items()}
        first = iteration(t, 1, stop=False)
        after = full_state_dict(t.policy)
        assert all(torch.equal(before[k], after[k]) for k in before), "the policy trained on NaN rewards"
        assert first["prm/nonfinite_skipped_update"] == 1 and "policy/loss" not in first
        assert first["train/skipped_steps_total"] == cfg.policy.mini_batches * cfg.policy.epochs
        second = iteration(t, 2, stop=True)
        finish(t, second)
    assert second["prm/nonfinite_skipped_update"] == 1
    assert [r["step"] for r in read_metrics(t.run_dir / "metrics.jsonl")] == [0, 1, 2]
    assert "non-finite" in capsys.readouterr().out
    assert not math.isnan(first["outcome/acc_mean"])
