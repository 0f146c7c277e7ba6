"""prime_vs_rloo's numbers from hand-made metrics.jsonl files whose answers were computed by hand: seed mean and
std, trailing smoothing, steps for PRIME to reach RLOO's final training reward, final differences; which runs
count as finished; and the script's --report-only path end to end in a real subprocess (no training)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import prime_vs_rloo  # noqa: E402
import prime_vs_rloo_report as rep  # noqa: E402

# Training reward (outcome/acc_mean) at iterations 1..4 per seed, held-out accuracy at 0 and 4, PRM pairwise.
RLOO_REWARD = [[0.1, 0.2, 0.3, 0.4], [0.2, 0.2, 0.3, 0.4], [0.3, 0.2, 0.3, 0.4]]  # mean 0.2 0.2 0.3 0.4
PRIME_REWARD = [[0.3, 0.5, 0.5, 0.6]] * 3  # mean 0.3 0.5 0.5 0.6
RLOO_EVAL = [(0.2, 0.30), (0.2, 0.32), (0.2, 0.34)]
PRIME_EVAL = [(0.2, 0.40), (0.2, 0.42), (0.2, 0.44)]
PRM = [0.5, 0.6, 0.7, 0.8]


def records(reward: list[float], ev: tuple[float, float], prm: list[float] | None) -> list[dict]:
    out = [{"step": 0, "eval/acc": ev[0]}]
    for i, r in enumerate(reward, start=1):
        rec = {"step": i, "outcome/acc_mean": r}
        if prm is not None:
            rec["prm/pairwise_acc"] = prm[i - 1]
        out.append(rec)
    out[-1]["eval/acc"] = ev[1]
    return out


def runs() -> dict[str, list[list[dict]]]:
    return {
        "prime": [records(r, e, PRM) for r, e in zip(PRIME_REWARD, PRIME_EVAL, strict=True)],
        "rloo": [records(r, e, None) for r, e in zip(RLOO_REWARD, RLOO_EVAL, strict=True)],
    }


def write_run(run_dir: Path, recs: list[dict], iterations: int) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"train:\n  iterations: {iterations}\n  seed: 0\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_seed_mean_std_min_max():
    c = rep.curves(runs(), "outcome/acc_mean")["rloo"]
    assert c.steps == [1, 2, 3, 4] and c.n_seeds == 3
    assert c.mean == pytest.approx([0.2, 0.2, 0.3, 0.4])
    assert c.std[0] == pytest.approx(math.sqrt(0.02 / 3))  # (0.1, 0.2, 0.3): deviations -0.1, 0, 0.1
    assert c.std[1:] == pytest.approx([0.0, 0.0, 0.0])
    assert (c.lo[0], c.hi[0]) == pytest.approx((0.1, 0.3))


def test_seed_that_logged_less_bounds_the_curve():
    c = rep.over_seeds([{1: 1.0, 2: 2.0, 3: 3.0}, {1: 3.0, 2: 4.0}])
    assert c.steps == [1, 2] and c.mean == pytest.approx([2.0, 3.0]) and c.std == pytest.approx([1.0, 1.0])


def test_smooth_is_trailing_mean():
    assert rep.smooth([1.0, 3.0, 5.0, 7.0], 2) == pytest.approx([1.0, 2.0, 4.0, 6.0])
    assert rep.smooth([1.0, 3.0, 5.0], 1) == [1.0, 3.0, 5.0]
    with pytest.raises(ValueError, match="window"):
        rep.smooth([1.0], 0)


def test_comparison_against_hand_computed():
    rs = runs()
    rew, ev = rep.curves(rs, "outcome/acc_mean"), rep.curves(rs, "eval/acc")
    c = rep.compare("prime", rew["prime"], rew["rloo"], ev["prime"], ev["rloo"], window=2)
    # smoothed rloo 0.2 0.2 0.25 0.35 -> final 0.35, first reached at 4; prime 0.3 0.4 0.5 0.55 -> 0.35 at 2
    assert c.baseline_final_reward == pytest.approx(0.35) and c.final_reward == pytest.approx(0.55)
    assert c.baseline_steps_to_own_final == 4 and c.steps_to_baseline_final == 2
    assert c.speedup == pytest.approx(2.0)
    assert c.reward_diff == pytest.approx(0.20) and c.reward_diff_relative == pytest.approx(0.20 / 0.35)
    # held-out final: prime 0.42 ± sqrt(0.0008/3), rloo 0.32 ± the same
    assert c.final_eval == pytest.approx(0.42) and c.baseline_final_eval == pytest.approx(0.32)
    assert c.final_eval_std == pytest.approx(math.sqrt(0.0008 / 3))
    assert c.eval_diff == pytest.approx(0.10) and c.eval_ahead_beyond_spread is True


def test_never_reaching_and_within_spread():
    rs = runs()
    rew, ev = rep.curves(rs, "outcome/acc_mean"), rep.curves(rs, "eval/acc")
    c = rep.compare("rloo-as-variant", rew["rloo"], rew["prime"], ev["rloo"], ev["prime"], window=2)
    assert c.steps_to_baseline_final is None and c.speedup is None
    assert c.reward_diff == pytest.approx(-0.20) and c.eval_ahead_beyond_spread is False


def test_table_shows_the_numbers():
    md = rep.table(runs(), window=2, header="# t")
    prime_row = next(ln for ln in md.splitlines() if ln.startswith("| prime | 3 |"))
    assert (
        "42.0 ± 1.6" in prime_row and "55.0 ± 0.0" in prime_row and "0.750" in prime_row
    )  # PRM: (0.7+0.8)/2
    assert "n/a (not logged)" in next(ln for ln in md.splitlines() if ln.startswith("| rloo |"))
    vs = next(ln for ln in md.splitlines() if ln.startswith("| prime | 2 (4)"))
    assert "2.00x" in vs and "+20.0 (+57.1%)" in vs and "+10.0" in vs and "yes" in vs


def test_run_state(tmp_path):
    recs = runs()["prime"][0]
    write_run(tmp_path / "done", recs, iterations=4)
    assert prime_vs_rloo.run_state(tmp_path / "done") == "done"
    write_run(tmp_path / "short", recs[:-1], iterations=4)  # stopped before the last iteration
    assert prime_vs_rloo.run_state(tmp_path / "short") == "fresh"
    (tmp_path / "short" / "checkpoints" / "step_00000003").mkdir(parents=True)
    assert prime_vs_rloo.run_state(tmp_path / "short") == "resume"
    assert prime_vs_rloo.run_state(tmp_path / "absent") == "fresh"


def test_trainer_flags_pass_through():
    args, flags = prime_vs_rloo.parse_args(
        ["--seeds", "3", "4", "5", "--train.iterations", "7", "--report-only"]
    )
    assert args.seeds == [3, 4, 5] and args.report_only and flags == ["--train.iterations", "7"]


def test_report_only_end_to_end(tmp_path):
    for variant, seeds in runs().items():
        for seed, recs in enumerate(seeds):
            write_run(tmp_path / "runs" / f"{variant}_seed{seed}", recs, iterations=4)
    write_run(tmp_path / "runs" / "prime-none_seed0", runs()["prime"][0][:2], iterations=4)  # unfinished
    cmd = [sys.executable, "benchmarks/prime_vs_rloo.py", "--report-only", "--window", "2",
           "--variants", "prime", "prime-none", "rloo", "--out", str(tmp_path / "runs"),
           "--results", str(tmp_path / "res")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "res.md").read_text()
    assert "2.00x" in md and "Not finished, left out: prime-none_seed0, prime-none_seed1" in md
    assert (tmp_path / "res.png").read_bytes()[:4] == b"\x89PNG"


def test_prm_warmup_iterations_are_left_out_and_rl_iterations_renumbered(tmp_path):
    """A run with 2 PRM warm-up iterations compares at equal policy updates: its step 3 is RL iteration 1."""
    lines = [{"step": 0, "eval/acc": 0.2}, {"step": 1, "prm/warmup": 1, "outcome/acc_mean": 0.9},
             {"step": 2, "prm/warmup": 1, "outcome/acc_mean": 0.9}, {"step": 3, "outcome/acc_mean": 0.1},
             {"step": 4, "outcome/acc_mean": 0.2, "eval/acc": 0.3}]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    got = rep.read_records(path)
    assert [(r["step"], r.get("outcome/acc_mean")) for r in got] == [(0, None), (1, 0.1), (2, 0.2)]
    assert rep.series(got, "eval/acc") == {0: 0.2, 2: 0.3}
