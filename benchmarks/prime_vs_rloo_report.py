"""The numbers, table and plot of PRIME vs outcome-only RLOO from the runs' metrics.jsonl files (issue 12, part 3).

Pure functions of the records, so tests can feed hand-made files; `prime_vs_rloo.py` runs the training and calls
`write_report`. A variant's curve is the mean over its seeds at the iterations every seed logged; the training
reward is `outcome/acc_mean` (all sampled responses, before the filter), the held-out accuracy `eval/acc`.
"""

import json
import math
import pathlib
from dataclasses import dataclass

TRAIN_REWARD, EVAL_ACC, PRM_PAIRWISE = "outcome/acc_mean", "eval/acc", "prm/pairwise_acc"
BASELINE = "rloo"


@dataclass
class Curve:
    """One metric of one variant over iterations: mean, std (population, ddof=0), min and max over seeds."""

    steps: list[int]
    mean: list[float]
    std: list[float]
    lo: list[float]
    hi: list[float]
    n_seeds: int


def read_records(path: str | pathlib.Path) -> list[dict]:
    """A run's metrics lines; a PRM warm-up's iterations (`prm/warmup`) are left out and the RL iterations
    renumbered from 1, so that runs compare at equal policy updates."""
    records = [json.loads(ln) for ln in pathlib.Path(path).read_text().splitlines() if ln.strip()]
    warmup = sum(1 for r in records if r.get("prm/warmup"))
    return [
        {**r, "step": r["step"] - warmup} if r["step"] > 0 else r for r in records if not r.get("prm/warmup")
    ]


def series(records: list[dict], key: str) -> dict[int, float]:
    """step -> value of `key`, for the records that have it (null = non-finite is skipped)."""
    return {r["step"]: r[key] for r in records if r.get(key) is not None}


def over_seeds(per_seed: list[dict[int, float]]) -> Curve:
    """Mean/std/min/max over seeds at the steps every seed has (a seed that logged less bounds the curve)."""
    if not per_seed:
        raise ValueError("over_seeds: no runs")
    steps = sorted(set.intersection(*(set(s) for s in per_seed)))
    mean, std, lo, hi = [], [], [], []
    for step in steps:
        xs = [s[step] for s in per_seed]
        m = sum(xs) / len(xs)
        mean.append(m)
        std.append(math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)))
        lo.append(min(xs))
        hi.append(max(xs))
    return Curve(steps, mean, std, lo, hi, len(per_seed))


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: point i is the mean of values[max(0, i - window + 1) : i + 1]."""
    if window < 1:
        raise ValueError(f"smooth: window must be >= 1, got {window}")
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def first_step_reaching(steps: list[int], values: list[float], target: float) -> int | None:
    """The first step whose value is >= target (None if never)."""
    return next((s for s, v in zip(steps, values, strict=True) if v >= target), None)


@dataclass
class Comparison:
    """A variant against the RLOO baseline on the seed-mean curves (rewards as fractions, not percent)."""

    variant: str
    final_reward: float  # smoothed training reward at the last common iteration
    baseline_final_reward: float
    steps_to_baseline_final: int | None  # first iteration the variant's smoothed reward >= baseline's final
    baseline_steps_to_own_final: int  # same for the baseline itself (<= its last iteration)
    final_eval: float | None
    final_eval_std: float | None
    baseline_final_eval: float | None
    baseline_final_eval_std: float | None

    @property
    def speedup(self) -> float | None:
        """Baseline's steps to its final reward / the variant's (the paper's 2.5x)."""
        if not self.steps_to_baseline_final:
            return None
        return self.baseline_steps_to_own_final / self.steps_to_baseline_final

    @property
    def reward_diff(self) -> float:
        return self.final_reward - self.baseline_final_reward

    @property
    def reward_diff_relative(self) -> float | None:
        return self.reward_diff / self.baseline_final_reward if self.baseline_final_reward else None

    @property
    def eval_diff(self) -> float | None:
        if self.final_eval is None or self.baseline_final_eval is None:
            return None
        return self.final_eval - self.baseline_final_eval

    @property
    def eval_ahead_beyond_spread(self) -> bool | None:
        """Ahead on held-out accuracy by more than the two variants' seed std together (±1 std bars apart)."""
        if self.eval_diff is None:
            return None
        return self.eval_diff > self.final_eval_std + self.baseline_final_eval_std


def compare(variant: str, reward: Curve, base_reward: Curve, ev: Curve | None, base_ev: Curve | None,
            window: int) -> Comparison:  # fmt: skip
    """Compare on the iterations both reward curves have; `window` smooths the training reward."""
    common = sorted(set(reward.steps) & set(base_reward.steps))
    if not common:
        raise ValueError(f"compare: {variant} and {BASELINE} share no iteration")
    pick = lambda c: [m for s, m in zip(c.steps, c.mean, strict=True) if s in set(common)]
    ours, base = smooth(pick(reward), window), smooth(pick(base_reward), window)
    last = lambda c: (c.mean[-1], c.std[-1]) if c is not None and c.steps else (None, None)
    (fe, fe_std), (be, be_std) = last(ev), last(base_ev)
    return Comparison(
        variant=variant, final_reward=ours[-1], baseline_final_reward=base[-1],
        steps_to_baseline_final=first_step_reaching(common, ours, base[-1]),
        baseline_steps_to_own_final=first_step_reaching(common, base, base[-1]),
        final_eval=fe, final_eval_std=fe_std, baseline_final_eval=be, baseline_final_eval_std=be_std,
    )  # fmt: skip


def curves(runs: dict[str, list[list[dict]]], key: str) -> dict[str, Curve]:
    """variant -> seed-mean curve of `key`, for the variants whose every run logged it."""
    out = {}
    for variant, seeds in runs.items():
        per_seed = [series(records, key) for records in seeds]
        if per_seed and all(per_seed):
            out[variant] = over_seeds(per_seed)
    return out


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def table(runs: dict[str, list[list[dict]]], window: int, header: str) -> str:
    """The markdown report: per variant, final held-out accuracy and training reward (mean ± std over seeds),
    then each variant against RLOO, then the PRM pairwise accuracy averaged over the last `window` iterations."""
    rew, ev, prm = curves(runs, TRAIN_REWARD), curves(runs, EVAL_ACC), curves(runs, PRM_PAIRWISE)
    lines = [header, "", f"Training reward smoothed with a trailing mean over {window} iterations; accuracies in %,",
             "mean ± std (population) over seeds at the last iteration every seed logged.", "",
             "| variant | seeds | iterations | held-out acc start | held-out acc final | train reward final (smoothed) "
             f"| PRM pairwise, last {window} its |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for variant in runs:
        r, e, p = rew.get(variant), ev.get(variant), prm.get(variant)
        start = f"{_pct(e.mean[0])} ± {_pct(e.std[0])}" if e else "n/a"
        final = f"{_pct(e.mean[-1])} ± {_pct(e.std[-1])}" if e else "n/a"
        reward = f"{_pct(smooth(r.mean, window)[-1])} ± {_pct(r.std[-1])}" if r else "n/a"
        tail = f"{sum(p.mean[-window:]) / len(p.mean[-window:]):.3f}" if p else "n/a (not logged)"
        iters = r.steps[-1] if r else "n/a"
        lines.append(
            f"| {variant} | {len(runs[variant])} | {iters} | {start} | {final} | {reward} | {tail} |"
        )
    if BASELINE in rew:
        lines += ["", f"Against outcome-only {BASELINE} (same budget, seed-mean curves):", "",
                  f"| variant | steps to {BASELINE}'s final reward ({BASELINE} itself) | speedup (paper 2.5x) "
                  "| final reward diff, points (relative; paper +6.9%) | held-out acc diff, points "
                  "| ahead beyond ±1 std |", "|---|---|---|---|---|---|"]  # fmt: skip
        for variant in rew:
            if variant == BASELINE:
                continue
            c = compare(variant, rew[variant], rew[BASELINE], ev.get(variant), ev.get(BASELINE), window)
            reach = "never" if c.steps_to_baseline_final is None else str(c.steps_to_baseline_final)
            speed = "n/a" if c.speedup is None else f"{c.speedup:.2f}x"
            rel = "n/a" if c.reward_diff_relative is None else f"{100 * c.reward_diff_relative:+.1f}%"
            ahead = {None: "n/a", True: "yes", False: "no"}[c.eval_ahead_beyond_spread]
            lines.append(f"| {variant} | {reach} ({c.baseline_steps_to_own_final}) | {speed} | "
                         f"{_pct(c.reward_diff, True)} ({rel}) | {_pct(c.eval_diff, True)} | {ahead} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[list[dict]]], window: int, title: str, out: str | pathlib.Path) -> pathlib.Path:
    """Three panels against the iteration: held-out accuracy (error bars = std over seeds), smoothed training
    reward (band = min..max over seeds, smoothed alike) and smoothed PRM pairwise accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for variant, c in curves(runs, EVAL_ACC).items():
        axes[0].errorbar(c.steps, c.mean, yerr=c.std, capsize=3, marker="o", label=variant)
    for variant, c in curves(runs, TRAIN_REWARD).items():
        (line,) = axes[1].plot(c.steps, smooth(c.mean, window), label=variant)
        axes[1].fill_between(
            c.steps, smooth(c.lo, window), smooth(c.hi, window), alpha=0.2, color=line.get_color()
        )
    for variant, c in curves(runs, PRM_PAIRWISE).items():
        (line,) = axes[2].plot(c.steps, smooth(c.mean, window), label=variant)
        axes[2].fill_between(
            c.steps, smooth(c.lo, window), smooth(c.hi, window), alpha=0.2, color=line.get_color()
        )
    axes[2].axhline(0.5, color="grey", linestyle=":", label="chance")
    names = ("held-out greedy accuracy (±std)", f"training reward, {window}-it mean (min..max)",
             f"PRM pairwise acc, fresh batches, {window}-it mean")  # fmt: skip
    for ax, name in zip(axes, names, strict=True):
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = pathlib.Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
