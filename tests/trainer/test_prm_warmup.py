"""prm.warmup_iterations: iterations before RL in which only the PRM trains (train.py), on the scoring model.

What must hold, each checked against facts independent of the trainer: the policy the first RL iteration updates
is bit-equal to the starting model; the PRM trains in every warm-up iteration (with one mini-batch and update
'after' its first forward runs the reference's weights, so the first log-ratio is exactly 0 and the second is
not); the run has warm-up + RL steps; the held-out evaluation counts RL iterations.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastprime.trainer import train as train_module
from fastprime.trainer.main import main
from fastprime.trainer.metrics import read_metrics
from fastprime.trainer.models import full_state_dict

CONFIG = """
model: {{source: path, path: {model}}}
data: {{source: file, train_path: {data}, max_prompt_tokens: 64}}
rollout: {{n_samples: 4, max_new_tokens: 12, prompts_per_generate: 8}}
filter: {{enabled: false}}
verifier: {{workers: 1, timeout_s: 5.0}}
prm: {{lr: 1.0e-2, mini_batches: 1, update: after, warmup_iterations: 2}}
policy: {{lr: 1.0e-3, mini_batches: 1, epochs: 1}}
eval: {{every: 1, path: {data}, max_rows: 8, max_new_tokens: 12}}
train: {{iterations: 1, batch_size: 4, micro_batch_tokens: 160}}
run: {{checkpoint_every: 0, progress: false, export_hf: false}}
"""
pytestmark = pytest.mark.usefixtures("cpu_only")


def test_warmup_trains_only_the_prm_then_rl_starts_from_the_unchanged_policy(tmp_path, scoring_model, capsys):
    model, data = scoring_model
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.format(model=model, data=data))
    policies_updated = []

    def recording_policy_phase(policy, *args, **kwargs):
        policies_updated.append({k: v.detach().clone() for k, v in full_state_dict(policy).items()})
        return real_policy_phase(policy, *args, **kwargs)

    real_policy_phase = train_module.policy_phase
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "policy_phase", recording_policy_phase)
        assert main(["--config", str(cfg), "--run.output-dir", str(tmp_path), "--run.name", "r"]) == 0

    start = AutoModelForCausalLM.from_pretrained(model).state_dict()
    assert len(policies_updated) == 1, "one RL iteration: one policy update"
    (updated,) = policies_updated
    assert updated.keys() == start.keys()
    diff = {
        k: float((updated[k].cpu().double() - start[k].double()).abs().max())
        for k in start
        if not torch.equal(updated[k].cpu(), start[k])
    }
    assert not diff, diff

    records = {r["step"]: r for r in read_metrics(tmp_path / "r" / "metrics.jsonl")}
    assert sorted(records) == [0, 1, 2, 3]
    assert [records[s].get("prm/warmup") for s in (1, 2, 3)] == [1, 1, None]
    assert ["policy/loss" in records[s] for s in (1, 2, 3)] == [False, False, True]
    assert all("prm/grad_norm" in records[s] for s in (1, 2, 3))
    # the PRM trained in iteration 1: its q is exactly 0 there (reference weights) and not in iteration 2
    assert records[1]["process/seq_sum_mean"] == 0.0
    assert records[2]["process/seq_sum_mean"] != 0.0
    # eval.every 1 counts RL iterations: the start (step 0) and RL iteration 1 (step 3), not the warm-up
    assert [s for s in (0, 1, 2, 3) if records[s].get("eval/acc") is not None] == [0, 3]
    assert "after 1 iterations (after 2 PRM warm-up iterations)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prm.warmup-iterations", "-1"], "prm.warmup_iterations=-1 must be >= 0"),
        (["--algorithm.process-coef", "0"], "needs a PRM that trains"),
        (["--prm.update", "none"], "needs a PRM that trains"),
    ],
)
def test_warmup_bad_values_are_named(tmp_path, scoring_model, capsys, flags, message):
    model, data = scoring_model
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.format(model=model, data=data))
    assert main(["--config", str(cfg), "--run.output-dir", str(tmp_path), *flags]) != 0
    assert message in capsys.readouterr().err
