"""The metrics record of an iteration (metrics.py): phase stats merged in order, tokens/s from the phase times,
and the JSON lines the logger writes (non-finite numbers as null)."""

import pytest

from fastprime.trainer.metrics import MetricsLogger, iteration_record, read_metrics


def test_iteration_record_by_hand():
    stats = [{"rollout/tokens": 300, "filter/rounds": 1}, {"prm/loss": 0.5}, {"policy/loss": -0.1}]
    times = {"time/rollout_s": 3.0, "time/prm_s": 0.5, "time/policy_s": 2.0, "time/logprob_old_s": 0.25}
    rec = iteration_record(7, stats, times, batch_tokens=100, policy_epochs=2, skipped_total=3)
    assert rec == pytest.approx(
        {
            "step": 7,
            "rollout/tokens": 300,
            "filter/rounds": 1,
            "prm/loss": 0.5,
            "policy/loss": -0.1,
            "perf/prm_tokens_per_s": 200.0,
            "perf/policy_tokens_per_s": 100.0,  # 100 tokens x 2 epochs in 2 s
            "perf/logprob_tokens_per_s": 400.0,
            "perf/rollout_tokens_per_s": 100.0,
            "train/skipped_steps_total": 3,
        }
    )


def test_skipped_iteration_has_no_batch_throughput():
    rec = iteration_record(
        2, [{"rollout/tokens": 0}], {}, batch_tokens=None, policy_epochs=1, skipped_total=0
    )
    assert rec == {
        "step": 2,
        "rollout/tokens": 0,
        "perf/rollout_tokens_per_s": 0.0,
        "train/skipped_steps_total": 0,
    }


def test_logger_writes_json_lines_with_null_for_non_finite(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, total=2, progress=False)
    log.log({"step": 1, "prm/loss": float("nan"), "eval/acc": 0.5})
    log.log({"step": 2, "prm/loss": 0.25})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "prm/loss": None, "eval/acc": 0.5},
        {"step": 2, "prm/loss": 0.25},
    ]


def test_recent_mean_covers_the_last_steps_that_logged_the_key():
    from fastprime.trainer.metrics import recent_mean

    recs = [{"step": 0}] + [{"step": s, "k": float(s)} for s in range(1, 31)] + [{"step": 31}]
    assert recent_mean(recs, "k", last=5) == pytest.approx(
        (27 + 28 + 29 + 30) / 4
    )  # steps 27..31; 31 lacks k
    assert recent_mean(recs, "absent", last=5) is None and recent_mean([], "k", last=5) is None
