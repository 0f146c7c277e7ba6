"""fastprime's PRIME trainer: `python trainer/main.py [--config FILE.yaml] [--section.key value ...]`.

With no arguments it runs the built-in demo (configs/demo.yaml). Under `torchrun` there is one process per
device; plain `python` is the same code with a process group of one. One iteration (prime.md):

    rollout -> verify -> filter/refill -> old & reference log-probs -> PRM forward (+ update) -> token rewards
    -> advantages -> PPO mini-batches -> weight sync -> metrics -> checkpoint

Every rank samples its share of the prompts and all ranks then hold the whole batch (token ids and scores are
all-gathered), so filtering, the refill buffer and the advantages are identical everywhere; only the model
passes split the sequences across ranks (balanced by tokens).
"""

from __future__ import annotations

import copy
import logging
import os
import pathlib
import random
import sys
import time

# `python trainer/main.py` puts trainer/ first on sys.path, where e.g. data.py would shadow other packages.
if sys.path and pathlib.Path(sys.path[0]).resolve() == pathlib.Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fastprime.trainer.algorithms import (  # noqa: E402
    RefillBuffer,
    compute_advantages,
    group_filter_mask,
    outcome_stats,
    prm_pairwise_accuracy,
    process_reward_stats,
    process_token_rewards,
    response_stats,
)
from fastprime.trainer.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from fastprime.trainer.config import Config, config_to_dict, load_config, save_config  # noqa: E402
from fastprime.trainer.data import Prompt, PromptStream, build_prompts, load_prompts  # noqa: E402
from fastprime.trainer.metrics import MetricsLogger, plot_curves  # noqa: E402
from fastprime.trainer.models import full_state_dict, init_distributed, load_causal_lm, shard_model  # noqa: E402
from fastprime.trainer.passes import Batch, Dist, logprob_pass, policy_pass, prm_pass  # noqa: E402
from fastprime.trainer.rollout import HFRolloutEngine  # noqa: E402


class SetupError(ValueError):
    """A problem with the run's inputs (config, data, model folder): reported as one line, no traceback."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Accumulates wall time per phase into `time/<phase>_s`."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, {}

    def __call__(self, phase: str):
        timer = self

        class _Span:
            def __enter__(self):
                _sync(timer.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                _sync(timer.device)
                key = f"time/{phase}_s"
                timer.times[key] = timer.times.get(key, 0.0) + time.perf_counter() - self.t0

        return _Span()


def generation_seed(seed: int, step: int, round_: int, rank: int) -> int:
    """Sampling seed of one rollout round: a function of the position in the run, so resume replays it."""
    return (((seed * 1_000_003 + step) * 131 + round_) * 257 + rank) % (2**62)


# ---------------------------------------------------------------------------------------------------------------
# setup


def load_tokenizer_and_model(cfg: Config):
    """(tokenizer, fp32 HF causal LM) of the policy's starting point: the demo's, or from a local folder."""
    if cfg.model.source == "demo":
        from fastprime.trainer.demo import build_tiny_model, build_tokenizer

        tok = build_tokenizer()
        return tok, build_tiny_model(tok, seed=cfg.train.seed)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path, local_files_only=True)
        lm = load_causal_lm(cfg.model.path, attn_implementation=cfg.model.attn_implementation)
    except (OSError, ValueError, ImportError) as e:
        raise SetupError(f"cannot load model.path={cfg.model.path!r}: {e}") from None
    if tok.eos_token_id is None:
        raise SetupError(f"tokenizer of {cfg.model.path!r} has no eos_token: generation could never stop")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # batched greedy evaluation continues each prompt from its last token
    return tok, lm


def eos_token_ids(tok, lm) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config lists (chat models often have two)."""
    ids = [tok.eos_token_id]
    extra = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra] if extra is not None else []
    return sorted(set(ids))


def eval_row(p: Prompt) -> dict:
    return {"prompt": p.messages, "ability": p.ability, "reward_model": {"ground_truth": p.ground_truth}}


def load_data(cfg: Config, tok) -> tuple[list[Prompt], list[dict], list[dict], dict]:
    """(training prompts, held-out rows for greedy evaluation, demo training rows for the warm start, load stats)."""
    dc = cfg.data
    if dc.source == "demo":
        from fastprime.trainer.demo import make_arithmetic_rows

        train_rows = make_arithmetic_rows(dc.demo_train_rows, seed=cfg.train.seed)
        eval_rows = make_arithmetic_rows(dc.demo_eval_rows, seed=cfg.train.seed, split="test")
        prompts, stats = build_prompts(
            train_rows, tok, source="demo task", max_prompt_tokens=dc.max_prompt_tokens, bad_rows=dc.bad_rows
        )
        return prompts, eval_rows[: dc.eval_max_rows], train_rows, {"data/too_long": stats.too_long}
    prompts, stats = load_prompts(
        dc.train_path, tok, max_prompt_tokens=dc.max_prompt_tokens, bad_rows=dc.bad_rows
    )
    eval_rows = []
    if dc.eval_path:
        held_out, _ = load_prompts(
            dc.eval_path, tok, max_prompt_tokens=dc.max_prompt_tokens, bad_rows=dc.bad_rows
        )
        eval_rows = [eval_row(p) for p in held_out[: dc.eval_max_rows]]
    return prompts, eval_rows, [], {"data/bad_rows": stats.bad_rows, "data/too_long": stats.too_long}


def choose_run_dir(cfg: Config, rank: int) -> tuple[pathlib.Path, pathlib.Path | None]:
    """(run folder, checkpoint to resume from or None). A fresh run never overwrites one that has checkpoints."""
    run_dir = cfg.run_dir
    if cfg.run.resume == "auto":
        return run_dir, latest_checkpoint(run_dir / "checkpoints")
    if cfg.run.resume:
        path = pathlib.Path(cfg.run.resume)
        if not (path / "trainer_state.pt").is_file():
            raise SetupError(
                f"run.resume={cfg.run.resume!r} is not a checkpoint folder (no trainer_state.pt)"
            )
        return path.parent.parent, path
    chosen = [run_dir]
    if rank == 0:  # one decision for all ranks
        i = 2
        while latest_checkpoint(chosen[0] / "checkpoints") is not None:
            chosen[0] = run_dir.with_name(f"{run_dir.name}-{i}")
            i += 1
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0], None


def broadcast_weights(lm: torch.nn.Module, device: torch.device) -> None:
    """Make every rank's copy equal rank 0's (after a warm start that ran on rank 0 only)."""
    if dist.get_world_size() == 1:
        return
    for t in lm.state_dict().values():
        buf = t.to(device)
        dist.broadcast(buf, src=0)
        t.copy_(buf)


# ---------------------------------------------------------------------------------------------------------------
# rollout, verification and filtering


def rollout_round(
    engine, pool, prompts: list[Prompt], idx: list[int], *, k: int, seed: int, d: Dist, timer, tok
) -> tuple[list[dict], dict[str, int]]:
    """Sample k responses for each prompt in idx (split over ranks) and verify them.

    Returns every rank the same (groups in idx order, verifier failure counts summed over ranks)."""
    mine = idx[d.rank :: d.world]
    with timer("rollout"):
        rollouts = engine.generate([prompts[i].prompt_ids for i in mine], n=k, seed=seed) if mine else []
    with timer("verify"):
        items = [
            {
                "ability": prompts[i].ability,
                "response": tok.decode(r.response_ids, skip_special_tokens=True),
                "ground_truth": prompts[i].ground_truth,
            }
            for j, i in enumerate(mine)
            for r in rollouts[j * k : (j + 1) * k]
        ]
        result = pool.score(items) if items else None
    local = [
        {
            "prompt": i,
            "responses": [r.response_ids for r in rollouts[j * k : (j + 1) * k]],
            "truncated": [r.truncated for r in rollouts[j * k : (j + 1) * k]],
            "acc": [float(s) for s in result.scores[j * k : (j + 1) * k]],
        }
        for j, i in enumerate(mine)
    ]
    failures = dict(result.failures) if result is not None else {}
    gathered = [None] * d.world
    dist.all_gather_object(gathered, (local, failures))
    by_prompt, total_failures = {}, {}
    for groups, fails in gathered:
        for g in groups:
            by_prompt[g["prompt"]] = g
        for kind, count in fails.items():
            total_failures[kind] = total_failures.get(kind, 0) + count
    return [by_prompt[i] for i in idx], total_failures


def collect_batch(
    engine, pool, prompts, stream, buffer, cfg: Config, step: int, d: Dist, timer, tok, record: dict
):
    """Groups for this iteration: refill buffer first, then rollout rounds until B groups pass or max_rounds."""
    B, k, f = cfg.train.batch_size, cfg.rollout.n_samples, cfg.filter
    groups = buffer.take(B)
    from_buffer = len(groups)
    all_acc, all_trunc, all_len, failures, rounds, seen, passed = [], [], [], {}, 0, 0, 0
    while len(groups) < B and rounds < f.max_rounds:
        rounds += 1
        new, new_failures = rollout_round(
            engine, pool, prompts, stream.take(B), k=k, seed=generation_seed(cfg.train.seed, step, rounds, d.rank),
            d=d, timer=timer, tok=tok,
        )  # fmt: skip
        with timer("filter"):
            acc = torch.tensor([a for g in new for a in g["acc"]])
            trunc = torch.tensor([t for g in new for t in g["truncated"]])
            all_acc.append(acc)
            all_trunc.append(trunc)
            all_len += [len(r) for g in new for r in g["responses"]]
            for kind, c in new_failures.items():
                failures[kind] = failures.get(kind, 0) + c
            if f.enabled:
                keep = group_filter_mask(
                    acc, k=k, lo=f.lo, hi=f.hi, truncated=trunc, drop_truncated=f.drop_truncated
                )
            else:
                keep = torch.ones(len(new), dtype=torch.bool)
            ok = [g for g, kp in zip(new, keep.tolist()) if kp]
            seen, passed = seen + len(new), passed + len(ok)
            need = B - len(groups)
            groups += ok[:need]
            buffer.add(ok[need:])
    record.update(
        {
            "filter/pass_rate": passed / max(seen, 1),
            "filter/rounds": rounds,
            "filter/from_buffer": from_buffer,
            "filter/buffer_size": len(buffer),
            "filter/missing_groups": B - len(groups),
            "rollout/responses": len(all_len),
            "rollout/tokens": sum(all_len),
            "verify/failures": sum(failures.values()),
            **{f"verify/failures_{kind}": c for kind, c in failures.items()},
        }
    )
    if all_len:  # no rollout at all when the refill buffer alone filled the batch
        acc, trunc = torch.cat(all_acc), torch.cat(all_trunc)
        lengths = torch.tensor(all_len, dtype=torch.float64)
        record.update(outcome_stats(acc, k=k))  # outcome/acc_mean: every rollout of the iteration, unfiltered
        record["response/length_mean"] = float(lengths.mean())
        record["response/length_max"] = float(lengths.max())
        record["response/truncation_rate"] = float(trunc.float().mean())
    if len(groups) < B:
        record["filter/max_rounds_hit"] = 1
    return groups


# ---------------------------------------------------------------------------------------------------------------
# the run


def train(cfg: Config, d: Dist) -> dict:
    """Run (or resume) the configured training; returns the last metrics record."""
    from fastprime.trainer.verifiers import VerifierPool

    with VerifierPool(workers=cfg.verifier.workers, timeout_s=cfg.verifier.timeout_s) as pool:
        return _train(cfg, d, pool)


def _train(cfg: Config, d: Dist, pool) -> dict:
    rank, device, K = d.rank, d.device, cfg.rollout.n_samples
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    tok, lm = load_tokenizer_and_model(cfg)
    try:
        prompts, eval_rows, warm_rows, data_stats = load_data(cfg, tok)
    except ValueError as e:  # a malformed row or file: one line naming file and row
        raise SetupError(f"data: {e}") from None
    run_dir, resume_from = choose_run_dir(cfg, rank)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    use_prm = cfg.algorithm.process_coef != 0
    use_ref = use_prm or cfg.policy.kl_coef > 0
    say = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    say(f"run folder: {run_dir}  (world size {d.world}, device {device})")

    # Warm start (demo): the result is the SFT checkpoint that policy, PRM and reference all start from.
    warm = None
    if cfg.model.source == "demo" and cfg.model.warm_start and resume_from is None:
        from fastprime.trainer.warmstart import warm_start

        if rank == 0:
            say("warm start: supervised training on worked solutions ...")
            lm.to(device)
            warm = warm_start(lm, tok, warm_rows, eval_rows, config=cfg.warmstart, verifier=pool)
            lm.cpu()
            say(
                f"warm start: {warm.steps} steps in {warm.seconds:.0f} s, held-out greedy accuracy {warm.acc:.1%}"
            )
        broadcast_weights(lm, device)

    engine = HFRolloutEngine(
        lm, eos_token_ids=eos_token_ids(tok, lm), pad_token_id=tok.pad_token_id, temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
        prompts_per_generate=cfg.rollout.prompts_per_generate, device=device,
    )  # fmt: skip
    shard = dict(device=device, mixed_precision=cfg.model.mixed_precision)
    prm_lm = None
    if use_prm:
        if cfg.model.prm_path:
            try:
                prm_lm = load_causal_lm(cfg.model.prm_path, attn_implementation=cfg.model.attn_implementation)
            except (OSError, ValueError, ImportError) as e:
                raise SetupError(f"cannot load model.prm_path={cfg.model.prm_path!r}: {e}") from None
        else:
            prm_lm = copy.deepcopy(lm)  # PRIME's default: the PRM starts from the policy's SFT weights
    ref = shard_model(copy.deepcopy(lm), trainable=False, **shard) if use_ref else None
    prm_train = use_prm and cfg.prm.update != "none"
    prm = (
        shard_model(
            prm_lm, trainable=prm_train, activation_checkpointing=cfg.model.activation_checkpointing, **shard
        )
        if use_prm
        else None
    )
    policy = shard_model(
        lm, trainable=True, activation_checkpointing=cfg.model.activation_checkpointing, **shard
    )
    pc, rc = cfg.policy, cfg.prm
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    prm_opt = (
        torch.optim.AdamW(prm.parameters(), lr=rc.lr, weight_decay=rc.weight_decay) if prm_train else None
    )

    models = {
        "policy": policy,
        **({"prm": prm} if prm is not None else {}),
        **({"ref": ref} if ref is not None else {}),
    }
    optimizers = {"policy": (policy, policy_opt), **({"prm": (prm, prm_opt)} if prm_opt is not None else {})}
    stream = PromptStream(len(prompts), seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    buffer = RefillBuffer()
    state = {"step": 0, "skipped_steps": 0, "initial_eval": None, "warmstart": None}

    def evaluate() -> float | None:
        if not eval_rows:
            return None
        from fastprime.trainer.evaluate import greedy_accuracy

        acc = [None]
        if rank == 0:
            tc = cfg.train
            acc[0] = greedy_accuracy(
                engine.model,
                tok,
                eval_rows,
                max_new_tokens=tc.eval_max_new_tokens,
                batch_size=tc.eval_batch_size,
                verifier=pool,
            )
        dist.broadcast_object_list(acc, src=0)
        return acc[0]

    if resume_from is not None:
        trainer_state = load_checkpoint(resume_from, models=models, optimizers=optimizers)
        stream.load_state_dict(trainer_state["stream"])
        buffer.load_state_dict(trainer_state["buffer"])
        state.update(trainer_state["state"])
        engine.sync_weights(full_state_dict(policy))
        say(f"resumed from {resume_from} at iteration {state['step']}")
    # On resume, lines after the checkpoint's step are dropped (they are recomputed); a fresh run starts empty.
    try:
        log = MetricsLogger(
            run_dir, enabled=rank == 0, total=cfg.train.iterations, initial=state["step"], progress=cfg.run.progress,
            tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb, wandb_project=cfg.run.wandb_project,
            config=config_to_dict(cfg), truncate_after=state["step"] if resume_from is not None else -1,
        )  # fmt: skip
    except ValueError as e:  # a tracking package that is not installed
        raise SetupError(str(e)) from None
    if resume_from is None:
        t0 = time.perf_counter()
        acc0 = evaluate()
        state["initial_eval"] = acc0
        if warm is not None:
            state["warmstart"] = {"steps": warm.steps, "acc": warm.acc, "seconds": warm.seconds}
        rec = {"step": 0, **data_stats, "time/eval_s": time.perf_counter() - t0}
        if acc0 is not None:
            rec["eval/acc"] = acc0
        if warm is not None:
            rec.update(
                {"warmstart/steps": warm.steps, "warmstart/acc": warm.acc, "warmstart/seconds": warm.seconds}
            )
        log.log(rec, advance=False)

    def checkpoint(step: int) -> None:
        trainer_state = {"stream": stream.state_dict(), "buffer": buffer.state_dict(), "state": dict(state)}
        save_checkpoint(
            run_dir / "checkpoints", step, models=models, optimizers=optimizers, trainer_state=trainer_state,
            keep=cfg.run.keep_checkpoints,
        )  # fmt: skip

    record: dict = {}
    last_eval_step = None
    for ran, step in enumerate(range(state["step"] + 1, cfg.train.iterations + 1), start=1):
        t_iter = time.perf_counter()
        timer = Timer(device)
        record = {"step": step}

        # 1-3. rollout, verify, filter/refill
        groups = collect_batch(engine, pool, prompts, stream, buffer, cfg, step, d, timer, tok, record)
        if groups:
            batch = Batch(
                prompts=[prompts[g["prompt"]].prompt_ids for g in groups for _ in range(K)],
                responses=[r for g in groups for r in g["responses"]],
                acc=torch.tensor([a for g in groups for a in g["acc"]], dtype=torch.float32),
                truncated=torch.tensor([t for g in groups for t in g["truncated"]]),
                k=K,
            )
            mask = batch.mask.to(device)
            acc = batch.acc.to(device)
            n_tokens = sum(len(p) + len(r) - 1 for p, r in zip(batch.prompts, batch.responses))
            record["batch/responses"], record["batch/tokens"] = batch.n, n_tokens
            record["outcome/acc_kept_mean"] = float(batch.acc.mean())
            record.update(
                {f"batch/{k}": v for k, v in response_stats(mask, truncated=batch.truncated).items()}
            )

            # 4. log-probs without gradient: the trainer's own, not the rollout engine's
            with timer("logprob_old"):
                old_logp, entropy = logprob_pass(policy, batch, d, temperature=cfg.rollout.temperature)
            ref_logp = None
            if ref is not None:
                with timer("logprob_ref"):
                    ref_logp, _ = logprob_pass(ref, batch, d, temperature=cfg.rollout.temperature)

            # 5. implicit PRM: rewards and update
            rewards = None
            if prm is not None:
                prm_kw = dict(
                    mini_batches=rc.mini_batches,
                    beta=rc.beta,
                    temperature=cfg.rollout.temperature,
                    max_norm=rc.grad_clip,
                )
                with timer("prm"):
                    res = prm_pass(prm, prm_opt, batch, ref_logp, d, update=rc.update != "none", **prm_kw)
                    seq_q = (res.q * mask).sum(1)
                    record["prm/pairwise_acc"] = prm_pairwise_accuracy(seq_q, acc, k=K)
                    if rc.update == "before":  # rewards from a second forward, after the update
                        res_after = prm_pass(prm, None, batch, ref_logp, d, update=False, **prm_kw)
                        q = res_after.q
                        record["prm/pairwise_acc_after"] = prm_pairwise_accuracy((q * mask).sum(1), acc, k=K)
                    else:
                        q = res.q
                record["prm/loss"] = res.loss
                if rc.update != "none":
                    record.update({"prm/grad_norm": res.grad_norm, "prm/skipped_steps": res.skipped})
                record["perf/prm_tokens_per_s"] = n_tokens / max(timer.times["time/prm_s"], 1e-9)
                with timer("advantages"):
                    rewards = process_token_rewards(q, mask, granularity=rc.granularity, norm=rc.norm)
                    record.update(process_reward_stats(rewards, mask, acc))
                state["skipped_steps"] += res.skipped

            # 6. advantages
            ac = cfg.algorithm
            with timer("advantages"):
                adv = compute_advantages(
                    acc, rewards, mask, k=K, estimator=ac.estimator, outcome_coef=ac.outcome_coef,
                    process_coef=ac.process_coef, gamma=ac.gamma, whiten=ac.whiten, process_loo=ac.process_loo,
                )  # fmt: skip
                record.update(adv.stats)

            # 7. PPO mini-batches
            with timer("policy"):
                pr = policy_pass(
                    policy, policy_opt, batch, old_logp, adv.advantages, d, ref_logp=ref_logp,
                    mini_batches=pc.mini_batches, epochs=pc.epochs, loss_agg=pc.loss_agg, clip_low=pc.clip_low,
                    clip_high=pc.clip_high, dual_clip=pc.dual_clip, kl_coef=pc.kl_coef, entropy_coef=pc.entropy_coef,
                    temperature=cfg.rollout.temperature, max_norm=pc.grad_clip,
                )  # fmt: skip
            state["skipped_steps"] += pr.skipped
            record.update(
                {
                    "policy/loss": pr.loss,
                    "policy/grad_norm": pr.grad_norm,
                    "policy/skipped_steps": pr.skipped,
                    "policy/clip_frac": pr.stats["clip_frac_low"] + pr.stats["clip_frac_high"],
                    **{f"policy/{k}": v for k, v in pr.stats.items()},
                    "policy/entropy_old": float((entropy * mask).sum() / mask.sum()),
                    "perf/policy_tokens_per_s": n_tokens
                    * pc.epochs
                    / max(timer.times["time/policy_s"], 1e-9),
                    "perf/logprob_tokens_per_s": n_tokens / max(timer.times["time/logprob_old_s"], 1e-9),
                }
            )

            # 8. weight sync into the rollout engine
            with timer("sync"):
                engine.sync_weights(full_state_dict(policy))
        else:
            log.write(
                f"iteration {step}: no group passed the filter in {cfg.filter.max_rounds} rounds; no update"
            )
            record["filter/skipped_update"] = 1
        record["perf/rollout_tokens_per_s"] = record["rollout/tokens"] / max(
            timer.times.get("time/rollout_s", 0.0), 1e-9
        )
        record["train/skipped_steps_total"] = state["skipped_steps"]
        state["step"] = step

        final = step == cfg.train.iterations
        if final or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
            with timer("eval"):
                record["eval/acc"] = evaluate()
            last_eval_step = step
        stop = final or (cfg.run.stop_after and ran >= cfg.run.stop_after)
        if stop or (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0):
            with timer("checkpoint"):
                checkpoint(step)
        record.update(timer.times)
        record["time/iteration_s"] = time.perf_counter() - t_iter
        log.log(record)
        if stop:
            break

    # end of the run: HF export, plot, summary
    done = state["step"] >= cfg.train.iterations
    if done and cfg.run.export_hf and rank == 0:
        export_hf(engine.model, tok, run_dir / "hf")
    dist.barrier()
    log.close()
    if rank == 0:
        png = plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        first, last = (
            state["initial_eval"],
            record.get("eval/acc") if last_eval_step == state["step"] else None,
        )
        if done and first is not None and last is not None:
            print(
                f"held-out greedy accuracy: {first:.1%} after the warm start -> {last:.1%} after "
                f"{state['step']} iterations ({100 * (last - first):+.1f} points). Curves: {png}",
                flush=True,
            )
        else:
            print(
                f"stopped at iteration {state['step']} of {cfg.train.iterations}. Curves: {png}", flush=True
            )
    return record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(argv)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    rank, world, device = init_distributed()
    # Progress messages of the pieces (warm start, verifiers) on rank 0's console.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    d = Dist(rank=rank, world=world, device=device, token_budget=cfg.train.micro_batch_tokens)
    try:
        train(cfg, d)
        dist.barrier()  # ranks tear gloo/NCCL down together, not while a peer still writes its plot and summary
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
