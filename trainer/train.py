"""The PRIME run: `setup -> step (repeated) -> finish`. One step is one call per phase, in prime.md's order:

    rollout -> verify -> filter/refill -> log-probs -> PRM -> advantages -> policy -> weight sync

Each phase lives in its own file (rollout.py, passes.py, prm.py, advantages.py, policy.py) and returns
`(result, stats)`; metrics.py turns the stats into the iteration's metrics.jsonl line. Every rank holds the
whole batch (rollout all-gathers the groups), so filtering, the refill buffer and the advantages are identical
everywhere; only the model passes split the sequences across ranks (balanced by tokens).
"""

from __future__ import annotations

import dataclasses
import pathlib
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastprime.trainer.advantages import advantage_phase
from fastprime.trainer.batch import Batch
from fastprime.trainer.checkpoint import (
    ModelState,
    OptimizerState,
    Stateful,
    choose_run_dir,
    export_hf,
    load_checkpoint,
    save_checkpoint,
)
from fastprime.trainer.config import Config, SetupError, config_to_dict, save_config
from fastprime.trainer.data import Prompt, PromptStream, load_data
from fastprime.trainer.diagnostics import batch_stats, engine_agreement_stats
from fastprime.trainer.filtering import RefillBuffer
from fastprime.trainer.flops import peak_flops
from fastprime.trainer.metrics import (
    MetricsLogger,
    Timer,
    initial_record,
    iteration_record,
    model_flops_rates,
    plot_curves,
    read_metrics,
    recent_mean,
)
from fastprime.trainer.models import (
    broadcast_weights,
    build_models,
    full_state_dict,
    load_tokenizer_and_model,
)
from fastprime.trainer.passes import Dist, logprob_phase
from fastprime.trainer.policy import is_on_policy, minibatch_seed, policy_phase
from fastprime.trainer.prm import prm_phase
from fastprime.trainer.rollout import (
    HFRolloutEngine,
    RolloutEngine,
    build_rollout_engine,
    close_engine,
    collect_batch,
    engine_sleep,
    engine_wake,
    sync_policy,
)


@dataclass
class TrainState:
    """The loop's own counters; checkpointed with the models like every other component."""

    step: int = 0
    skipped_steps: int = 0  # optimizer steps (PRM and policy) skipped for a non-finite loss or gradient norm
    initial_eval: float | None = None  # held-out accuracy before the first iteration
    warmstart: dict | None = None  # what the warm start did: steps, acc, seconds
    filter_pass_rate: float | None = None  # the last iteration's; sizes the next one's first rollout round

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state_dict.get(f.name, f.default))  # a field newer than the checkpoint


@dataclass
class Trainer:
    """Everything one rank's run holds: config, data, verifier pool, engine, models, optimizers, state, log."""

    cfg: Config
    d: Dist
    tok: Any
    prompts: list[Prompt]
    eval_rows: list[dict]
    pool: Any  # verifiers.VerifierPool
    engine: RolloutEngine
    policy: nn.Module
    prm: nn.Module | None  # None when the process rewards are off (algorithm.process_coef = 0)
    ref: nn.Module | None  # None when neither the PRM nor a KL term needs it
    policy_opt: torch.optim.Optimizer
    prm_opt: torch.optim.Optimizer | None  # None for a frozen PRM (prm.update = none)
    stream: PromptStream
    buffer: RefillBuffer
    state: TrainState
    run_dir: pathlib.Path
    log: MetricsLogger | None = None

    def components(self) -> dict[str, Stateful]:
        """The checkpoint: every stateful component by name."""
        models = {"policy": self.policy, "prm": self.prm, "ref": self.ref}
        out: dict[str, Stateful] = {f"model.{k}": ModelState(m) for k, m in models.items() if m is not None}
        out["optim.policy"] = OptimizerState(self.policy, self.policy_opt)
        if self.prm_opt is not None:
            out["optim.prm"] = OptimizerState(self.prm, self.prm_opt)
        return {**out, "stream": self.stream, "buffer": self.buffer, "state": self.state}


def train(cfg: Config, d: Dist) -> dict:
    """Run (or resume) the configured training; returns the last metrics record."""
    from fastprime.trainer.verifiers import VerifierPool

    with VerifierPool(workers=cfg.verifier.workers, timeout_s=cfg.verifier.timeout_s) as pool:
        t = setup(cfg, d, pool)
        record: dict = {}
        last = total_iterations(cfg)
        for ran, step in enumerate(range(t.state.step + 1, last + 1), start=1):
            stop = step == last or bool(cfg.run.stop_after and ran >= cfg.run.stop_after)
            record = iteration(t, step, stop=stop)
            if stop:
                break
        finish(t, record)
        close_engine(t.engine)
    return record


def total_iterations(cfg: Config) -> int:
    """Steps of the run: the PRM warm-up's, then the RL iterations."""
    return cfg.prm.warmup_iterations + cfg.train.iterations


def train_step(t: Trainer, step: int, timer: Timer) -> dict:
    """One PRIME iteration (prime.md "One iteration"); returns its metrics record."""
    cfg, d, T = t.cfg, t.d, t.cfg.rollout.temperature
    # 1-3. rollout, verify, filter/refill
    groups, rollout_stats = collect_batch(
        t.engine, t.pool, t.prompts, t.stream, t.buffer, cfg, step, d, timer, t.tok,
        pass_rate=t.state.filter_pass_rate,
    )  # fmt: skip
    t.state.filter_pass_rate = rollout_stats["filter/pass_rate"]
    if not groups:
        t.log.write(
            f"iteration {step}: no group passed the filter in {cfg.filter.max_rounds} rounds; no update"
        )
        return _without_policy_update(t, step, timer, [rollout_stats, {"filter/skipped_update": 1}])
    engine_sleep(t.engine)  # GPU sleep mode: the trainer's phases get the engine's memory until the sync
    batch = Batch.from_groups(groups, t.prompts, k=cfg.rollout.n_samples)
    prm_warmup = step <= cfg.prm.warmup_iterations  # only the PRM trains; no update needs old log-probs
    # 4. log-probs without gradient: the trainer's own, not the rollout engine's
    logprobs, logprob_stats = logprob_phase(
        t.policy, t.ref, batch, d, temperature=T, timer=timer, ref_parts=cfg.prm.mini_batches,
        on_policy=is_on_policy(cfg.policy) or prm_warmup,
    )  # fmt: skip
    # 5. implicit PRM: update in the configured order, token rewards
    rewards, prm_stats = None, {}
    if t.prm is not None:
        with timer("prm"):
            (rewards, skipped), prm_stats = prm_phase(
                t.prm, t.prm_opt, batch, logprobs.ref, d, config=cfg.prm, temperature=T
            )
        t.state.skipped_steps += skipped
        if not bool(torch.isfinite(rewards).all()):  # a diverged PRM: no policy update on its rewards
            t.log.write(f"iteration {step}: the PRM gave non-finite rewards; policy update skipped")
            t.state.skipped_steps += cfg.policy.mini_batches * cfg.policy.epochs
            skip = {"prm/nonfinite_skipped_update": 1}
            stats = [rollout_stats, batch_stats(batch), logprob_stats, prm_stats, skip]
            return _without_policy_update(t, step, timer, stats)
    if prm_warmup:
        stats = [rollout_stats, batch_stats(batch), logprob_stats, prm_stats, {"prm/warmup": 1}]
        return _without_policy_update(t, step, timer, stats, batch_tokens=batch.num_tokens)
    # 6. advantages
    with timer("advantages"):
        adv, adv_stats = advantage_phase(batch, rewards, d.device, config=cfg.algorithm)
    # 7. PPO mini-batches
    with timer("policy"):
        result, policy_stats = policy_phase(
            t.policy, t.policy_opt, batch, logprobs, adv.advantages, d, config=cfg.policy, temperature=T,
            seed=minibatch_seed(cfg.train.seed, step),
        )  # fmt: skip
    t.state.skipped_steps += result.skipped
    # the engine's sampling log-probs vs the trainer's at the same weights (the policy pass's when on-policy)
    old_logp = logprobs.old if logprobs.old is not None else result.logp
    policy_stats.update(engine_agreement_stats(batch.sample_logprobs, old_logp))
    # 8. weight sync into the rollout engine
    with timer("sync"):
        sync_policy(t.engine, t.policy)
    stats = [rollout_stats, batch_stats(batch), logprob_stats, prm_stats, adv_stats, policy_stats]
    return iteration_record(
        step, stats, timer.times, batch_tokens=batch.num_tokens, policy_epochs=cfg.policy.epochs,
        skipped_total=t.state.skipped_steps,
    )  # fmt: skip


def _without_policy_update(
    t: Trainer, step: int, timer: Timer, stats: list[dict], *, batch_tokens: int | None = None
) -> dict:
    """The record of an iteration that ends before the policy update (nothing passed the filter, a diverged
    PRM, a PRM warm-up). The policy is unchanged, so the engine keeps its weights: no sync, only a wake-up."""
    engine_wake(t.engine)
    return iteration_record(
        step,
        stats,
        timer.times,
        batch_tokens=batch_tokens,
        policy_epochs=0,
        skipped_total=t.state.skipped_steps,
    )


def iteration(t: Trainer, n: int, *, stop: bool) -> dict:
    """Iteration n: the step, then evaluation and checkpoint when due, then its metrics line."""
    cfg, t_iter, timer = t.cfg, time.perf_counter(), Timer(t.d.device)
    record = train_step(t, n, timer)
    t.state.step = n
    rl_step = n - cfg.prm.warmup_iterations  # policy updates so far
    if n == total_iterations(cfg) or (cfg.eval.every and rl_step > 0 and rl_step % cfg.eval.every == 0):
        with timer("eval"):
            record["eval/acc"] = evaluate(t)
    if stop or (cfg.run.checkpoint_every and n % cfg.run.checkpoint_every == 0):
        with timer("checkpoint"):
            save_checkpoint(t.run_dir / "checkpoints", n, t.components(), keep=cfg.run.keep_checkpoints)
    record.update(timer.times)
    record.update(model_flops_rates(record, peak_flops(t.d.device)))  # perf/<phase>_tflops, _mfu
    record["time/iteration_s"] = time.perf_counter() - t_iter
    t.log.log(record)
    return record


def evaluate(t: Trainer) -> float | None:
    """Held-out greedy accuracy of the current policy (rank 0 decodes, every rank gets the number)."""
    if not t.eval_rows:
        return None
    from fastprime.trainer.evaluate import greedy_accuracy

    acc = [None]
    if t.d.rank == 0:
        ec = t.cfg.eval
        # the hf engine's model decodes in eval.batch_size batches (larger than its sampling chunks: faster)
        generator = t.engine.model if isinstance(t.engine, HFRolloutEngine) else t.engine  # vllm: greedy()
        acc[0] = greedy_accuracy(
            generator, t.tok, t.eval_rows, max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size,
            verifier=t.pool,
        )  # fmt: skip
    dist.broadcast_object_list(acc, src=0)
    return acc[0]


def _say(d: Dist, msg: str) -> None:
    if d.rank == 0:
        print(msg, flush=True)


def setup(cfg: Config, d: Dist, pool) -> Trainer:
    """Seeds, data, run folder, warm start, engine, models and optimizers; then resume or log step 0."""
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    tok, lm = load_tokenizer_and_model(cfg)
    try:
        prompts, eval_rows, warm_rows, data_stats = load_data(cfg, tok)
    except ValueError as e:  # a malformed row or file: one line naming file and row
        raise SetupError(f"data: {e}") from None
    if cfg.train.batch_size > len(prompts):  # one rollout round samples B distinct prompts
        n = len(prompts)
        raise SetupError(f"train.batch_size={cfg.train.batch_size} exceeds the {n} training prompts")
    run_dir, resume_from = choose_run_dir(cfg, d.rank)
    if d.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    _say(d, f"run folder: {run_dir}  (world size {d.world}, device {d.device})")
    warm = None
    if cfg.model.source == "demo" and cfg.warmstart.enabled and resume_from is None:
        warm = _warm_start(cfg, d, lm, tok, warm_rows, eval_rows, pool)
    engine = build_rollout_engine(cfg, lm, tok, d.device, work_dir=run_dir)
    models = build_models(cfg, lm, d.device)
    policy, prm = models["policy"], models.get("prm")
    pc, rc = cfg.policy, cfg.prm
    policy_opt = _adamw(policy, lr=pc.lr, weight_decay=pc.weight_decay)
    prm_opt = None
    if prm is not None and rc.update != "none":
        prm_opt = _adamw(prm, lr=rc.lr, weight_decay=rc.weight_decay, logit_scale_lr=rc.logit_scale_lr)
    stream = PromptStream(len(prompts), seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    t = Trainer(
        cfg, d, tok, prompts, eval_rows, pool, engine, policy, prm, models.get("ref"), policy_opt, prm_opt,
        stream, RefillBuffer(), TrainState(), run_dir,
    )  # fmt: skip
    if resume_from is not None:
        load_checkpoint(resume_from, t.components())
        sync_policy(engine, policy)
        _say(d, f"resumed from {resume_from} at iteration {t.state.step}")
    t.log = _open_log(t, resumed=resume_from is not None)
    if resume_from is None:
        t0 = time.perf_counter()
        t.state.initial_eval = evaluate(t)
        if warm is not None:
            t.state.warmstart = {"steps": warm.steps, "acc": warm.acc, "seconds": warm.seconds}
        rec = initial_record(data_stats, t.state.initial_eval, warm, time.perf_counter() - t0)
        t.log.log(rec, advance=False)
    return t


def _adamw(
    model: nn.Module, *, lr: float, weight_decay: float, logit_scale_lr: float = 0.0
) -> torch.optim.AdamW:
    """AdamW with its fused kernel: one call over all parameters instead of a dozen ops per parameter (a CPU step
    of the 1M-parameter demo model: ~2 ms instead of ~13 ms, a few % of a pass). Same update up to rounding.
    A PRM's logit scale gets its own learning rate and no weight decay (decay would pull it toward 0, i.e.
    toward uniform log-probs)."""
    scale = getattr(model, "logit_scale", None)
    body = [p for p in model.parameters() if p is not scale]
    groups = [{"params": body}]
    if scale is not None:
        groups.append({"params": [scale], "lr": logit_scale_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)


def _warm_start(cfg: Config, d: Dist, lm: nn.Module, tok, train_rows, eval_rows, pool):
    """The demo's supervised warm start (rank 0, then broadcast): the SFT start of policy, PRM and reference."""
    from fastprime.trainer.warmstart import warm_start

    warm = None
    if d.rank == 0:
        _say(d, "warm start: supervised training on worked solutions ...")
        lm.to(d.device)
        warm = warm_start(lm, tok, train_rows, eval_rows, config=cfg.warmstart, verifier=pool)
        lm.cpu()
        _say(
            d,
            f"warm start: {warm.steps} steps in {warm.seconds:.0f} s, held-out greedy accuracy {warm.acc:.1%}",
        )
    broadcast_weights(lm, d.device)
    return warm


def _open_log(t: Trainer, *, resumed: bool) -> MetricsLogger:
    """The metrics logger; on resume, lines after the checkpoint's step are dropped (they are recomputed)."""
    cfg = t.cfg
    try:
        return MetricsLogger(
            t.run_dir, enabled=t.d.rank == 0, total=total_iterations(cfg), initial=t.state.step,
            progress=cfg.run.progress, tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb,
            wandb_project=cfg.run.wandb_project, config=config_to_dict(cfg),
            truncate_after=t.state.step if resumed else -1,
        )  # fmt: skip
    except ValueError as e:  # a tracking package that is not installed
        raise SetupError(str(e)) from None


def finish(t: Trainer, record: dict) -> None:
    """End of the run: HF export of the final policy, the plot, a one-line summary."""
    cfg, state = t.cfg, t.state
    done = state.step >= total_iterations(cfg)
    if done and cfg.run.export_hf:
        weights = full_state_dict(t.policy)  # a collective; the engine may hold no HF model (vllm)
        if t.d.rank == 0:
            export_hf(t.policy.lm, t.tok, t.run_dir / "hf", state_dict=weights)
    dist.barrier()
    t.log.close()
    if t.d.rank != 0:
        return
    png = plot_curves(t.run_dir / "metrics.jsonl", t.run_dir / "curves.png")
    first, last = state.initial_eval, record.get("eval/acc")  # last: only if evaluated in the last iteration
    if done and first is not None and last is not None:
        when = "after the warm start" if state.warmstart is not None else "before RL"
        warmup = cfg.prm.warmup_iterations
        after_warmup = f" (after {warmup} PRM warm-up iterations)" if warmup else ""
        print(
            f"held-out greedy accuracy: {first:.1%} {when} -> {last:.1%} after "
            f"{cfg.train.iterations} iterations{after_warmup} ({100 * (last - first):+.1f} points). Curves: {png}",
            flush=True,
        )
    elif done:
        print(
            f"finished all {state.step} iterations (no held-out evaluation at the end). Curves: {png}",
            flush=True,
        )
    else:
        print(f"stopped at iteration {state.step} of {total_iterations(cfg)}. Curves: {png}", flush=True)
    prm_acc = recent_mean(read_metrics(t.run_dir / "metrics.jsonl"), "prm/pairwise_acc", last=25)
    if prm_acc is not None:  # whether the PRM's rewards carried information, not only whether accuracy rose
        print(
            f"implicit PRM: pairwise accuracy on fresh batches {prm_acc:.2f} over the last 25 iterations "
            "(0.5 = chance; correct vs wrong responses of the same prompt, before the PRM trained on them)",
            flush=True,
        )
