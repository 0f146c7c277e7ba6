"""The run end to end with a model that scores (scoring_model.py): options whose effect an untrained model hides.

An untrained model never answers right, so its outcome advantages are all zero and an estimator or temperature
that went missing in train.py would change nothing visible. Here one iteration runs in process (main(), CPU fp32)
on the scoring model at temperature 0.7, with the phases' real functions wrapped only to record what they got
and returned. Every expected value is independent of the trainer: hand-written estimator formulas over the
recorded verifier scores, and log-probs, entropies and gradients of an eager fp64 copy of the starting model.

With one PRM mini-batch and prm.update 'after', the PRM's only forward runs at the starting weights, equal to the
reference's, so its log-ratio and token rewards are exactly 0 and the advantages are the outcome estimator's alone.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastprime.trainer import train as train_module
from fastprime.trainer.main import main
from fastprime.trainer.metrics import read_metrics

T = 0.7
K = 4
CONFIG = """
model: {{source: path, path: {model}}}
data: {{source: file, train_path: {data}, max_prompt_tokens: 64}}
rollout: {{n_samples: 4, max_new_tokens: 12, prompts_per_generate: 8, temperature: {temperature}}}
filter: {{enabled: false}}
verifier: {{workers: 1, timeout_s: 5.0}}
prm: {{lr: 1.0e-3, mini_batches: 1, update: after}}
policy: {{lr: 1.0e-3, mini_batches: 1, epochs: 1}}
algorithm: {{whiten: false}}
eval: {{every: 0}}
train: {{iterations: 1, batch_size: 4, micro_batch_tokens: 160}}
run: {{checkpoint_every: 0, progress: false, export_hf: false}}
"""
pytestmark = pytest.mark.usefixtures("cpu_only")  # CPU fp32 on a CUDA host too (conftest.py)


def _recorded_run(tmp_path, scoring_model, name: str, *flags: str) -> dict:
    """One iteration; returns its metrics record and what the log-prob and advantage phases got and gave."""
    model, data = scoring_model
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(CONFIG.format(model=model, data=data, temperature=T))
    seen: dict = {}

    def recording(real, key):
        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            seen[key] = (args, out)
            return out

        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        for fn in ("logprob_phase", "advantage_phase"):
            mp.setattr(train_module, fn, recording(getattr(train_module, fn), fn))
        rc = main(["--config", str(cfg), "--run.output-dir", str(tmp_path), "--run.name", name, *flags])
    assert rc == 0
    (batch, rewards, *_), (adv, _) = seen["advantage_phase"]
    logprobs = seen["logprob_phase"][1][0]
    record = read_metrics(tmp_path / name / "metrics.jsonl")[-1]
    return {"record": record, "batch": batch, "rewards": rewards, "adv": adv.advantages, "logprobs": logprobs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, scoring_model, cpu_only):
    tmp = tmp_path_factory.mktemp("scoring_e2e")
    return {e: _recorded_run(tmp, scoring_model, e, "--algorithm.estimator", e) for e in ("rloo", "grpo")}


@pytest.fixture(scope="module")
def start_fp64(scoring_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(scoring_model[0], local_files_only=True).double()


def _eager(lm, batch, temperature: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per response: the log-probs of its sampled tokens and the entropy at each of its positions, under
    softmax(logits / temperature) of one unpacked fp64 forward (with gradient)."""
    logps, entropies = [], []
    for p, r in zip(batch.prompts, batch.responses):
        logits = lm(torch.tensor([p + r])).logits[0, len(p) - 1 : -1] / temperature
        logp_all = F.log_softmax(logits, dim=-1)
        logps.append(logp_all.gather(-1, torch.tensor(r)[:, None])[:, 0])
        entropies.append(-(logp_all.exp() * logp_all).sum(-1))
    return logps, entropies


def _grad_norm(lm, loss: torch.Tensor) -> float:
    lm.zero_grad(set_to_none=True)
    loss.backward()
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in lm.parameters() if p.grad is not None))


def _hand_advantages(acc: list[float], estimator: str) -> list[float]:
    """One advantage per response (on all its tokens: outcome only, gamma 1, no whitening), written out."""
    out = []
    for g in range(0, len(acc), K):
        group = acc[g : g + K]
        mean = sum(group) / K
        std = math.sqrt(sum((a - mean) ** 2 for a in group) / (K - 1))
        for a in group:
            if estimator == "rloo":
                out.append(a - (sum(group) - a) / (K - 1))
            else:  # grpo
                out.append((a - mean) / (std + 1e-6))
    return out


def test_estimator_changes_the_advantages_the_policy_trains_on(runs, start_fp64):
    """Pins `algorithm.estimator` end to end: from the same seed both runs sample the same batch, which holds
    mixed groups (so outcome advantages are not all zero); the advantages the policy gets are rloo's
    `a_i - mean_{j != i} a_j` and grpo's `(a_i - mean) / (std + 1e-6)` of the verifier scores, computed here
    by hand, and they differ. The policy's gradient norm in each run equals the norm of the eager fp64 gradient
    of the PPO loss at ratio 1 with those hand advantages (seq-mean-token-mean, temperature 0.7), so the
    advantages the estimator names are the ones the update used."""
    rloo, grpo = runs["rloo"], runs["grpo"]
    assert rloo["batch"].responses == grpo["batch"].responses and torch.equal(
        rloo["batch"].acc, grpo["batch"].acc
    )
    acc = rloo["batch"].acc.tolist()
    groups = [acc[g : g + K] for g in range(0, len(acc), K)]
    assert any(len(set(g)) > 1 for g in groups), f"no mixed group, outcome advantages all zero: {groups}"
    mask = rloo["batch"].mask
    for estimator, run in runs.items():
        assert torch.equal(run["rewards"], torch.zeros_like(run["rewards"])), "PRM == reference: rewards 0"
        hand = torch.tensor(_hand_advantages(acc, estimator), dtype=torch.float64)
        want = torch.where(mask, hand[:, None], 0)
        torch.testing.assert_close(run["adv"].double(), want, rtol=1e-6, atol=1e-6, msg=estimator)

        logps, _ = _eager(start_fp64, run["batch"], T)
        n = len(logps)
        loss = -sum(float(hand[i]) * logps[i].mean() for i in range(n)) / n
        assert run["record"]["policy/grad_norm"] == pytest.approx(_grad_norm(start_fp64, loss), rel=1e-4)
    assert not torch.allclose(runs["rloo"]["adv"], runs["grpo"]["adv"], atol=1e-3)


def test_temperature_reaches_the_policy_and_prm_passes(runs, start_fp64):
    """Pins rollout.temperature != 1 through every trainer pass, end to end (run at T = 0.7): the reference
    log-prob pass gives fp64 log_softmax(logits / T) of the sampled tokens; the policy pass's entropy (its
    only forward: one epoch of one mini-batch) is the fp64 entropy of softmax(logits / T); the PRM pass's
    gradient norm is that of fp64 BCE(sigmoid(beta * sum_t (logp_T - ref_T)), acc) at the starting weights;
    and the PRM's log-ratio is exactly 0 (PRM and reference at the same temperature). Each value is also
    checked to differ from its T = 1 counterpart, so a pass that dropped T would fail."""
    run = runs["rloo"]
    batch, rec, beta = run["batch"], run["record"], 0.05  # prm.beta, the default
    mask = batch.mask

    def padded(rows: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(mask.shape, dtype=torch.float64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row.detach()
        return out

    for temperature, expect_equal in ((T, True), (1.0, False)):
        logps, entropies = _eager(start_fp64, batch, temperature)
        ref_ok = torch.allclose(run["logprobs"].ref.double(), padded(logps), rtol=1e-5, atol=1e-5)
        entropy = float(sum(e.detach().sum() for e in entropies) / mask.sum())
        entropy_ok = rec["policy/entropy"] == pytest.approx(entropy, rel=1e-5)
        acc = batch.acc.double()
        # sum_t (logp - ref) at the starting weights: 0 in value, with the gradient of sum_t logp
        seq = torch.stack([lp.sum() - lp.detach().sum() for lp in logps])
        prm_loss = F.binary_cross_entropy_with_logits(beta * seq, acc)
        prm_ok = rec["prm/grad_norm"] == pytest.approx(_grad_norm(start_fp64, prm_loss), rel=1e-4)
        assert (ref_ok, entropy_ok, prm_ok) == (expect_equal,) * 3, (temperature, ref_ok, entropy_ok, prm_ok)
    assert torch.equal(run["rewards"], torch.zeros_like(run["rewards"]))


def test_end_of_run_reports_the_prm_pairwise_accuracy(tmp_path, scoring_model, capsys):
    """The last lines say whether the PRM's rewards carried information: the mean of the logged
    prm/pairwise_acc (mixed groups exist with this model, so it is logged)."""
    model, data = scoring_model
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        CONFIG.format(model=model, data=data, temperature=1.0).replace("iterations: 1", "iterations: 2")
    )
    assert main(["--config", str(cfg), "--run.output-dir", str(tmp_path), "--run.name", "r"]) == 0
    logged = [
        r["prm/pairwise_acc"]
        for r in read_metrics(tmp_path / "r" / "metrics.jsonl")
        if "prm/pairwise_acc" in r
    ]
    assert logged, "the scoring model should give mixed groups"
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("implicit PRM:"))
    assert f"fresh batches {sum(logged) / len(logged):.2f} over the last 25 iterations" in line, line
