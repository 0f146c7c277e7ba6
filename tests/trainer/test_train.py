"""The run (train.py) end to end on CPU: the tiny demo model trains for a few iterations, resumes exactly, and
runs every algorithm variant.

The runs skip the warm start and the filter (an untrained model solves nothing, so no group would pass);
the PRM still learns from the all-zero labels and its token rewards move the policy.
"""

import json
import pathlib

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.main import main
from fastprime.trainer.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = """
model: {source: demo}
warmstart: {enabled: false}
data: {source: demo, demo_train_rows: 64, demo_eval_rows: 8, max_prompt_tokens: 64}
rollout: {n_samples: 4, max_new_tokens: 12, prompts_per_generate: 8}
filter: {enabled: false}
verifier: {workers: 1, timeout_s: 5.0}
prm: {lr: 1.0e-3, mini_batches: 2}
policy: {lr: 1.0e-3, mini_batches: 2}
eval: {every: 2, max_new_tokens: 12, batch_size: 8}
train: {iterations: 3, batch_size: 4, micro_batch_tokens: 160}
run: {checkpoint_every: 0, keep_checkpoints: 5, progress: false}
"""
pytestmark = pytest.mark.usefixtures("cpu_only")  # CPU fp32 on a CUDA host too (conftest.py)
PHASES = ("rollout", "verify", "filter", "logprob_old", "logprob_ref", "prm", "advantages", "policy", "sync")


def _run(tmp_path, name: str, *extra: str) -> pathlib.Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    rc = main(["--config", str(cfg), "--run.output-dir", str(tmp_path), "--run.name", name, *extra])
    assert rc == 0
    return tmp_path / name


def _weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).state_dict()


def _checkpoint(run: pathlib.Path, step: int, tmp_path) -> dict:
    out = tmp_path / f"{run.name}_{step}.pt"
    dcp_to_torch_save(run / "checkpoints" / f"step_{step:08d}", out)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cpu_only):
    tmp = tmp_path_factory.mktemp("e2e")
    return _run(tmp, "full"), tmp


def _strip_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/"))}


def test_run_trains_and_writes_outputs(full_run):
    run, tmp = full_run
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert "eval/acc" in records[0] and "eval/acc" in records[2] and "eval/acc" in records[3]
    assert "eval/acc" not in records[1]
    for r in records[1:]:
        missing = [k for k in ("outcome/acc_mean", "prm/loss", "policy/loss", "policy/grad_norm", "prm/grad_norm",
                               "policy/clip_frac", "policy/approx_kl", "policy/entropy", "response/length_mean",
                               "response/truncation_rate", "filter/pass_rate", "verify/failures")
                   if r.get(k) is None]  # fmt: skip
        missing += [f"time/{p}_s" for p in PHASES if f"time/{p}_s" not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        assert 0.0 <= r["outcome/acc_mean"] <= 1.0 and r["rollout/responses"] == 16
    assert (run / "config.yaml").is_file() and (run / "curves.png").stat().st_size > 1000

    start = build_tiny_model(build_tokenizer(), seed=0).state_dict()
    final = _weights(run / "hf")
    moved = max(float((final[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-4, f"policy did not change (max change {moved})"
    ckpt = _checkpoint(run, 3, tmp)
    policy, prm, ref = (
        {k.removeprefix("lm."): v for k, v in ckpt[f"model.{m}"].items()} for m in ("policy", "prm", "ref")
    )
    assert set(policy) <= set(start) and set(start) - set(policy) <= {"lm_head.weight"}, sorted(policy)
    for k, v in policy.items():  # the HF export is the checkpoint's policy
        assert torch.equal(final[k], v), k
    prm_moved = max(float((prm[k] - start[k]).abs().max()) for k in prm)
    assert prm_moved > 1e-4, f"PRM did not change (max change {prm_moved})"
    assert all(torch.equal(ref[k], start[k]) for k in ref), "the reference must stay frozen"


def test_resume_reproduces_the_next_iteration(full_run):
    full, tmp = full_run
    part = _run(tmp, "part", "--run.stop-after", "2")
    assert [r["step"] for r in read_metrics(part / "metrics.jsonl")] == [0, 1, 2]
    assert (part / "checkpoints" / "step_00000002").is_dir() and not (part / "hf").exists()
    _run(tmp, "part", "--run.resume", "auto")
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    assert _strip_timing(b[3]) == _strip_timing(a[3])
    wa, wb = _weights(full / "hf"), _weights(part / "hf")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ from the uninterrupted run"


def test_nothing_passing_the_filter_ends_the_iteration(tmp_path):
    """An untrained model solves nothing: with the filter on, the iteration gives up after max_rounds, no hang."""
    run = _run(tmp_path, "nopass", "--filter.enabled", "--filter.max-rounds", "2", "--train.iterations", "1")
    rec = read_metrics(run / "metrics.jsonl")[-1]
    assert rec["step"] == 1 and rec["filter/skipped_update"] == 1 and rec["filter/rounds"] == 2
    assert rec["rollout/responses"] == 32 and "policy/loss" not in rec


@pytest.mark.parametrize(
    "flags, present, absent",
    [
        (["--prm.update", "before"], ["prm/pairwise_acc_after", "prm/loss"], []),
        (
            ["--prm.update", "none", "--algorithm.estimator", "grpo"],
            ["prm/loss", "returns/process_mean"],
            ["prm/grad_norm"],
        ),
        (
            ["--algorithm.process-coef", "0", "--algorithm.estimator", "reinforce"],
            ["policy/loss"],
            ["prm/loss", "returns/process_mean"],
        ),
        (
            [
                "--policy.loss-agg",
                "token-mean",
                "--policy.kl-coef",
                "0.1",
                "--policy.dual-clip",
                "3.0",
                "--model.activation-checkpointing",
            ],
            ["policy/kl_ref"],
            [],
        ),
    ],
    ids=["prm-before", "frozen-prm-grpo", "outcome-only-reinforce", "token-mean-kl-dual-clip-act-ckpt"],
)
def test_variants_run_one_iteration(tmp_path, flags, present, absent):
    run = _run(
        tmp_path,
        "variant",
        "--train.iterations",
        "1",
        "--eval.every",
        "0",
        "--data.demo-eval-rows",
        "0",
        *flags,
    )
    rec = read_metrics(run / "metrics.jsonl")[-1]
    assert rec["step"] == 1
    assert all(k in rec for k in present), [
        k for k in present if k not in rec
    ]  # null when undefined (no pairs)
    assert all(k not in rec for k in absent), [k for k in absent if k in rec]


def test_local_model_folder_and_verl_parquet(tmp_path):
    """A real run's inputs: an HF model folder (from_pretrained) and PRIME/verl Parquet + JSONL data files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastprime.trainer.demo import make_arithmetic_rows

    tok = build_tokenizer()
    build_tiny_model(tok, seed=0).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    pq.write_table(pa.Table.from_pylist(make_arithmetic_rows(16, seed=0)), tmp_path / "train.parquet")
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in make_arithmetic_rows(4, seed=0, split="test")))
    run = _run(
        tmp_path, "local", "--model.source", "path", "--model.path", str(tmp_path / "model"), "--data.source", "file",
        "--data.train-path", str(tmp_path / "train.parquet"), "--eval.path", str(held_out), "--train.iterations", "1",
    )  # fmt: skip
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1]
    assert records[0]["eval/acc"] is not None and records[1]["eval/acc"] is not None
    assert records[1]["rollout/responses"] == 16 and records[1]["policy/loss"] is not None


def test_kl_and_entropy_coefficients_change_the_loss_by_their_terms(tmp_path):
    """Same seed, so the same rollouts, rewards and advantages: the runs differ only in the policy loss. With one
    mini-batch and token-mean the reported loss is the mean over epochs of token means, as the kl_ref and
    entropy stats are, so loss(kl=c) - loss(0) = c * kl_ref and loss(ent=c) - loss(0) = -c * entropy.
    KL: 2 epochs, since the policy equals the reference in epoch 1 (kl 0, KL gradient 0, so epoch 2 starts from
    the same weights in both runs). Entropy: 1 epoch (the bonus changes the first step), and the entropy the loss
    used must equal the log-prob pass's entropy_old at the same weights."""
    flags = ["--train.iterations", "1", "--eval.every", "0", "--data.demo-eval-rows", "0", "--policy.mini-batches",
             "1", "--policy.loss-agg", "token-mean"]  # fmt: skip

    def last(name: str, *extra: str) -> dict:
        return read_metrics(_run(tmp_path, name, *flags, *extra) / "metrics.jsonl")[-1]

    base2, kl = (
        last("base2", "--policy.epochs", "2"),
        last("kl", "--policy.epochs", "2", "--policy.kl-coef", "0.5"),
    )
    assert kl["policy/kl_ref"] > 1e-5, "epoch 2 must see a policy away from the reference"
    assert kl["policy/loss"] - base2["policy/loss"] == pytest.approx(0.5 * kl["policy/kl_ref"], abs=1e-6)
    base1, ent = (
        last("base1", "--policy.epochs", "1"),
        last("ent", "--policy.epochs", "1", "--policy.entropy-coef", "0.1"),
    )
    assert (
        ent["policy/entropy"] == pytest.approx(ent["policy/entropy_old"], abs=1e-5)
        and ent["policy/entropy"] > 1.0
    )
    assert ent["policy/loss"] - base1["policy/loss"] == pytest.approx(-0.1 * ent["policy/entropy"], abs=1e-5)
