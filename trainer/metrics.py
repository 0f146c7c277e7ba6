"""Run outputs: the metrics record of each iteration, metrics.jsonl (one JSON object per iteration), a tqdm
bar, optional TensorBoard / W&B, a PNG.

Only rank 0 writes; other ranks get a logger whose calls do nothing. Non-finite numbers are written as null
so that every line stays valid JSON.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

import torch

PLOTTED = (
    ("outcome/acc_mean", "training accuracy (all rollouts)"),
    ("eval/acc", "held-out greedy accuracy"),
    ("prm/pairwise_acc", "PRM pairwise accuracy"),
    ("prm/loss", "PRM loss"),
    ("policy/entropy", "policy entropy"),
    ("response/length_mean", "response length (tokens)"),
)
BAR_KEYS = (
    ("outcome/acc_mean", "acc"),
    ("eval/acc", "eval"),
    ("prm/loss", "prm"),
    ("time/iteration_s", "s/it"),
)


class Timer:
    """Accumulates wall time per phase into `time/<phase>_s` (synchronising the GPU at both ends); on CUDA also
    the phase's peak allocated memory, `mem/<phase>_peak_gib`."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, phase: str):
        timer = self

        class _Span:
            def __enter__(self):
                timer._sync()
                if timer.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(timer.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer._sync()
                key = f"time/{phase}_s"
                timer.times[key] = timer.times.get(key, 0.0) + time.perf_counter() - self.t0
                if timer.device.type == "cuda":  # peak memory of the phase: mem/<phase>_peak_gib
                    peak = torch.cuda.max_memory_allocated(timer.device) / 2**30
                    mkey = f"mem/{phase}_peak_gib"
                    timer.times[mkey] = max(timer.times.get(mkey, 0.0), peak)

        return _Span()


def initial_record(data_stats: dict, eval_acc: float | None, warm, eval_seconds: float) -> dict[str, Any]:
    """The step-0 line: data loading counts, the warm start's result and the first held-out accuracy."""
    record = {"step": 0, **data_stats, "time/eval_s": eval_seconds}
    if eval_acc is not None:
        record["eval/acc"] = eval_acc
    if warm is not None:
        record.update(
            {"warmstart/steps": warm.steps, "warmstart/acc": warm.acc, "warmstart/seconds": warm.seconds}
        )
    return record


def iteration_record(
    step: int, phase_stats: list[dict], times: dict[str, float], *, batch_tokens: int | None,
    policy_epochs: int, skipped_total: int,
) -> dict[str, Any]:  # fmt: skip
    """One iteration's line: every phase's stats, tokens/s of the timed phases, the skipped-step counter.

    batch_tokens: tokens of the trained batch per pass (None when no batch was trained)."""
    record: dict[str, Any] = {"step": step}
    for stats in phase_stats:
        record.update(stats)
    per_s = lambda tokens, phase: tokens / max(times.get(f"time/{phase}_s", 0.0), 1e-9)
    if batch_tokens is not None:
        if "time/prm_s" in times:
            record["perf/prm_tokens_per_s"] = per_s(batch_tokens, "prm")
        if "time/policy_s" in times:  # not in a PRM warm-up iteration
            record["perf/policy_tokens_per_s"] = per_s(batch_tokens * policy_epochs, "policy")
        if "time/logprob_old_s" in times:  # not when the on-policy update skipped the pass
            record["perf/logprob_tokens_per_s"] = per_s(batch_tokens, "logprob_old")
    record["perf/rollout_tokens_per_s"] = per_s(record["rollout/tokens"], "rollout")
    record["train/skipped_steps_total"] = skipped_total
    return record


def model_flops_rates(record: dict[str, Any], peak: float | None) -> dict[str, float]:
    """Achieved model TFLOP/s `perf/<phase>_tflops` of each phase whose stats report its model FLOPs,
    `perf/<phase>_flops` (flops.py), over its time `time/<phase>_s`; and `perf/<phase>_mfu` = FLOPs / (time x
    peak) where the device's dense bf16 peak is known (flops.peak_flops), else no MFU at all. With several ranks
    both are rank 0's: its own tokens' FLOPs, its own time, one device's peak."""
    out = {}
    for key, flops in record.items():
        if not (key.startswith("perf/") and key.endswith("_flops")):
            continue
        phase = key.removeprefix("perf/").removesuffix("_flops")
        seconds = record.get(f"time/{phase}_s")
        if not seconds:  # a phase that did not run (or took no measurable time)
            continue
        out[f"perf/{phase}_tflops"] = flops / seconds / 1e12
        if peak is not None:
            out[f"perf/{phase}_mfu"] = flops / (seconds * peak)
    return out


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    """Writes each iteration's record to `<run>/metrics.jsonl` (appending on resume) and to the optional sinks."""

    def __init__(
        self,
        run_dir: str | pathlib.Path,
        *,
        enabled: bool,
        total: int,
        initial: int = 0,
        progress: bool = True,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "fastprime",
        config: dict | None = None,
        truncate_after: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self.bar = self.tb = self.wandb = None
        self.last: dict[str, Any] = {}
        if not enabled:
            return
        if truncate_after is not None:
            self._truncate(truncate_after)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(
                    "run.tensorboard needs the tensorboard package: pip install -e '.[tracking]'"
                ) from None
            self.tb = SummaryWriter(str(pathlib.Path(run_dir) / "tb"))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise ValueError("run.wandb needs the wandb package: pip install -e '.[tracking]'") from None
            name = pathlib.Path(run_dir).name
            self.wandb = wb.init(project=wandb_project, name=name, config=config, resume="allow")
        if progress:  # last, so that a failing sink leaves no progress bar behind
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="PRIME", unit="it", dynamic_ncols=True)

    def _truncate(self, step: int) -> None:
        """On resume, drop lines written after the checkpoint's step so the file has each step once."""
        if not self.path.is_file():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, record: dict[str, Any], *, advance: bool = True) -> None:
        """Append one record (must contain `step`); advance the progress bar by one iteration if asked."""
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.last.update({k: v for k, v in record.items() if v is not None})
        step = record["step"]
        numbers = {
            k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None and k != "step"
        }
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.bar is not None:
            self.bar.set_postfix(
                {
                    short: f"{self.last[k]:.3g}"
                    for k, short in BAR_KEYS
                    if isinstance(self.last.get(k), (int, float))
                },
                refresh=False,
            )
            if advance:
                self.bar.update(1)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(ln) for ln in pathlib.Path(path).read_text().splitlines() if ln.strip()]


def recent_mean(records: list[dict], key: str, *, last: int) -> float | None:
    """Mean of `key` over the records of the last `last` steps that have it; None if none has."""
    if not records:
        return None
    first = records[-1]["step"] - last + 1
    vals = [r[key] for r in records if r.get("step", 0) >= first and isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def plot_curves(metrics_path: str | pathlib.Path, out_path: str | pathlib.Path) -> pathlib.Path:
    """A PNG with one panel per main curve (those of PLOTTED present in the file) against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    present = [(k, title) for k, title in PLOTTED if any(r.get(k) is not None for r in records)]
    cols = 3
    rows = max(1, math.ceil(len(present) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (k, title) in zip(axes.flat, present):
        pts = [(r["step"], r[k]) for r in records if r.get(k) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    fig.suptitle(
        f"fastprime run {pathlib.Path(metrics_path).parent.name} ({time.strftime('%Y-%m-%d %H:%M')})"
    )
    fig.tight_layout()
    out_path = pathlib.Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
