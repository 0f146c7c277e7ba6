"""Rollout, verification and filtering, prime.md steps 1-3: the engines and the collection of one batch.

An engine has two calls: `generate(prompts, n=K, seed=...)` and `sync_weights(...)` (the trainer pushes the
policy's weights after every update, `sync_policy`). Two engines: `hf` (a decode loop over a transformers model,
a full copy of the policy) and `vllm` (vllm_engine.py, built in `build_rollout_engine`). The trainer computes its
own log-probs; the vLLM engine's sampling log-probs travel with the groups only to check that engine and trainer
agree.

Every rank samples its share of the prompts and all ranks then hold every group (token ids and scores are
all-gathered), so filtering, the refill buffer and the advantages are identical everywhere.
"""

from __future__ import annotations

import copy
import logging
import pathlib
from functools import partial
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import GenerationConfig

from fastprime.trainer import attention as packed_attention
from fastprime.trainer import decode_attention
from fastprime.trainer.batch import Group
from fastprime.trainer.config import Config
from fastprime.trainer.data import Prompt, PromptStream
from fastprime.trainer.decode import Rollout, decode, sample_token
from fastprime.trainer.diagnostics import outcome_stats
from fastprime.trainer.filtering import RefillBuffer, group_filter_mask, prompts_to_sample
from fastprime.trainer.flops import sequence_flops
from fastprime.trainer.passes import Dist

log = logging.getLogger(__name__)


class RolloutEngine(Protocol):
    config: object  # the generating model's HF config (the model FLOPs of generation, flops.py)

    def generate(self, prompts: list[list[int]], *, n: int, seed: int) -> list[Rollout]:
        """len(prompts) * n rollouts, grouped by prompt: the n samples of prompt 0 first."""
        ...

    def sync_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Load the policy's current full weights (HF key names)."""
        ...


class HFRolloutEngine:
    """Sampling with an unsharded copy of the policy, a transformers model (temperature, top_p, no top_k, stop at EOS),
    through decode.py's loop (not `generate`: decode.py says why).

    eos_token_ids: every id that ends a response (e.g. Qwen's <|im_end|> and <|endoftext|>)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        eos_token_ids: list[int],
        pad_token_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 3072,
        prompts_per_generate: int = 64,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = copy.deepcopy(model).to(device).eval()
        self.model.requires_grad_(False)
        if self.model.config._attn_implementation in ("sdpa", packed_attention.NAME):
            # the packed backend takes no mask, and sdpa copies the KV cache per step: decode_attention.py
            self.model.set_attn_implementation(decode_attention.register())  # sub-configs too
        if not eos_token_ids:
            raise ValueError("the rollout engine needs at least one EOS token id to stop generation")
        self.eos, self.pad = list(eos_token_ids), pad_token_id
        self.temperature, self.top_p = temperature, top_p
        self.max_new_tokens, self.chunk = max_new_tokens, prompts_per_generate
        self.device = torch.device(device)
        # Sampling is exactly temperature/top_p, as the trainer's log-probs assume: nothing from the checkpoint's
        # generation_config (repetition_penalty, top_k, min_p, ...), which `generate` would have merged in.
        ignored = _sampling_overrides(getattr(self.model, "generation_config", None))
        if ignored:
            log.warning(
                "rollout: ignoring the checkpoint's generation_config %s (sampling uses only rollout.*)",
                ignored,
            )
        # Tied lm_head/embedding weights appear once in a sharded state dict; loading either key fills both.
        self._tied = (
            {k for k in self.model.state_dict() if k == "lm_head.weight"} if self._is_tied() else set()
        )

    @property
    def config(self):
        return self.model.config

    def _is_tied(self) -> bool:
        emb, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        return head is not None and head.weight is emb.weight

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, n: int, seed: int) -> list[Rollout]:
        """Sample n responses to each prompt (ids without padding); deterministic given `seed`."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            pick = partial(sample_token, temperature=self.temperature, top_p=self.top_p)
            out: list[Rollout] = []
            for start in range(0, len(prompts), self.chunk):
                out += decode(
                    self.model, prompts[start : start + self.chunk], n=n, max_new_tokens=self.max_new_tokens,
                    eos_token_ids=self.eos, pad_token_id=self.pad, pick=pick,
                )  # fmt: skip
            return out

    @torch.no_grad()
    def sync_weights(self, state_dict: dict[str, Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        missing = set(missing) - self._tied
        if missing or unexpected:
            raise ValueError(
                f"weight sync mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )


_NOT_SAMPLING = {
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "decoder_start_token_id",
    "transformers_version",
}


def _sampling_overrides(config: GenerationConfig | None) -> dict:
    """The checkpoint's generation_config entries that would change sampling (those the engine ignores)."""
    if config is None:
        return {}
    return {
        k: v for k, v in config.to_diff_dict().items() if k not in _NOT_SAMPLING and not k.startswith("_")
    }


def eos_token_ids(tok, lm) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config lists (chat models often have two)."""
    ids = [tok.eos_token_id]
    extra = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra] if extra is not None else []
    return sorted(set(ids))


def build_rollout_engine(
    cfg: Config, model: nn.Module, tok, device: torch.device, *, work_dir: pathlib.Path | None = None
) -> RolloutEngine:
    """The engine `rollout.backend` names, over a copy of `model`'s current weights.

    vllm loads an HF folder: `model.path` for a real run, else `model` saved once under work_dir/engine_init
    (the demo's warm-started weights)."""
    rc = cfg.rollout
    if rc.backend == "vllm":
        return _build_vllm_engine(cfg, model, tok, work_dir)
    if rc.backend != "hf":
        raise ValueError(f"rollout.backend={rc.backend!r} is not available (only 'hf' and 'vllm')")
    return HFRolloutEngine(
        model, eos_token_ids=eos_token_ids(tok, model), pad_token_id=tok.pad_token_id, temperature=rc.temperature,
        top_p=rc.top_p, max_new_tokens=rc.max_new_tokens, prompts_per_generate=rc.prompts_per_generate, device=device,
    )  # fmt: skip


def _build_vllm_engine(cfg: Config, model: nn.Module, tok, work_dir: pathlib.Path | None):
    from fastprime.trainer.vllm_engine import VLLMRolloutEngine

    rc = cfg.rollout
    folder = pathlib.Path(cfg.model.path) if cfg.model.source == "path" else None
    if folder is None:
        if work_dir is None:
            raise ValueError("the vllm engine needs a work_dir to save the starting weights in")
        folder = work_dir / "engine_init"
        if dist.get_rank() == 0:  # every rank holds the same weights (after the warm start's broadcast)
            model.save_pretrained(folder)
        dist.barrier()
    on_gpu = torch.cuda.is_available()
    return VLLMRolloutEngine(
        folder, eos_token_ids=eos_token_ids(tok, model), temperature=rc.temperature, top_p=rc.top_p,
        max_new_tokens=rc.max_new_tokens, dtype="bfloat16" if on_gpu else "float32",
        max_model_len=cfg.data.max_prompt_tokens + max(rc.max_new_tokens, cfg.eval.max_new_tokens),
        kv_cache_bytes=rc.kv_cache_bytes or None, gpu_memory_utilization=rc.gpu_memory_utilization,
        sleep_mode=rc.sleep_mode, seed=cfg.train.seed,
    )  # fmt: skip


@torch.no_grad()
def sync_policy(engine: RolloutEngine, policy: nn.Module) -> None:
    """Push the policy's current weights into the engine (a collective: every rank calls it).

    hf: the full state dict; vllm: streamed one gathered parameter at a time in the engine's dtype, so no rank
    holds a full fp32 copy, then the engine drops its prefix cache (`sync_weights`)."""
    from fastprime.trainer.models import full_state_dict

    if isinstance(engine, HFRolloutEngine):
        engine.sync_weights(full_state_dict(policy))
        return
    from fastprime.trainer.vllm_engine import stream_full_params

    engine.sync_weights(stream_full_params(policy, dtype=engine.dtype))  # wakes a sleeping engine's weights
    if engine.sleeping:
        engine.wake_up()  # and its KV cache, for the evaluation or the next rollout


def close_engine(engine: RolloutEngine) -> None:
    """Shut a vllm engine down once every rank is done with it (all ranks call this). vLLM's shutdown also ends
    torch.distributed's default group, so it runs last, after a barrier; the hf engine needs nothing."""
    if hasattr(engine, "close"):
        dist.barrier()
        engine.close()


def engine_sleep(engine: RolloutEngine) -> None:
    """GPU sleep mode (vllm, rollout.sleep_mode): free the KV cache and move the weights to CPU memory while
    the trainer's phases run (level 1: a level-2 sleep would also drop the weights, which the sync refills
    anyway, but whether every buffer survives it was not checked). No-op for every other engine."""
    if getattr(engine, "sleep_mode", False):
        engine.sleep(level=1)


def engine_wake(engine: RolloutEngine) -> None:
    """Wake a sleeping engine with the weights it kept (level 1), for an iteration that left the policy unchanged:
    no weight sync needed. No-op for every other engine."""
    if getattr(engine, "sleeping", False):
        engine.wake_up()


def generation_seed(seed: int, step: int, round_: int, rank: int) -> int:
    """Sampling seed of one rollout round: a function of the position in the run, so resume replays it."""
    return (((seed * 1_000_003 + step) * 131 + round_) * 257 + rank) % (2**62)


def rollout_round(
    engine, pool, prompts: list[Prompt], idx: list[int], *, k: int, seed: int, d: Dist, timer, tok
) -> tuple[list[Group], dict[str, int]]:
    """Sample k responses for each prompt in idx (split over ranks) and verify them.

    Returns every rank the same (one group per entry of idx, in idx order: groups are keyed by position, so
    a repeated index gets two groups; verifier failure counts summed over ranks)."""
    mine = own_positions(len(idx), d)  # positions in idx
    with timer("rollout"):
        rollouts = engine.generate([prompts[idx[p]].prompt_ids for p in mine], n=k, seed=seed) if mine else []
    with timer("verify"):
        items = [
            {
                "ability": prompts[idx[p]].ability,
                "response": tok.decode(r.response_ids, skip_special_tokens=True),
                "ground_truth": prompts[idx[p]].ground_truth,
            }
            for j, p in enumerate(mine)
            for r in rollouts[j * k : (j + 1) * k]
        ]
        result = pool.score(items) if items else None
    local = [
        (
            p,
            Group(
                prompt=idx[p],
                responses=[r.response_ids for r in rollouts[j * k : (j + 1) * k]],
                truncated=[r.truncated for r in rollouts[j * k : (j + 1) * k]],
                acc=[float(s) for s in result.scores[j * k : (j + 1) * k]],
                logprobs=_sampling_logprobs(rollouts[j * k : (j + 1) * k]),
                seed=seed,
            ),
        )
        for j, p in enumerate(mine)
    ]
    failures = dict(result.failures) if result is not None else {}
    gathered = [None] * d.world
    dist.all_gather_object(gathered, (local, failures))
    by_position, total_failures = {}, {}
    for groups, fails in gathered:
        for p, g in groups:
            by_position[p] = g
        for kind, count in fails.items():
            total_failures[kind] = total_failures.get(kind, 0) + count
    return [by_position[p] for p in range(len(idx))], total_failures


def own_positions(n: int, d: Dist) -> list[int]:
    """The positions among a round's n prompts that this rank samples."""
    return list(range(d.rank, n, d.world))


def _own_generation_flops(config, prompts: list[Prompt], groups: list[Group], d: Dist) -> int:
    """Model FLOPs of this rank's generation in one round (flops.sequence_flops: per sample, its own tokens)."""
    own = [groups[p] for p in own_positions(len(groups), d)]
    prompt_lens = [len(prompts[g.prompt].prompt_ids) for g in own for _ in g.responses]
    return sequence_flops(config, prompt_lens, [len(r) for g in own for r in g.responses])


def _sampling_logprobs(rollouts: list[Rollout]) -> list[list[float]] | None:
    """The engine's per-token sampling log-probs of a group (vllm), or None (hf does not report them)."""
    if not all(hasattr(r, "logprobs") for r in rollouts):
        return None
    return [list(r.logprobs) for r in rollouts]


def collect_batch(
    engine, pool, prompts: list[Prompt], stream: PromptStream, buffer: RefillBuffer, cfg: Config, step: int,
    d: Dist, timer, tok, pass_rate: float | None = None,
) -> tuple[list[Group], dict[str, float]]:  # fmt: skip
    """Groups for this iteration: rollout rounds until B groups pass or max_rounds.

    The refill buffer holds prompt indices that passed beyond B earlier; the first round samples them again
    (with the current policy) before fresh prompts, so every group trained on was sampled in this iteration.
    A round samples as many prompts as the pass rate says it needs (`prompts_to_sample`): the last
    iteration's `pass_rate` (stats "filter/pass_rate") in the first round, this iteration's after it."""
    B, k, f = cfg.train.batch_size, cfg.rollout.n_samples, cfg.filter
    buffered = buffer.take(B)
    from_buffer, buffer_passed, groups = len(buffered), 0, []
    all_acc, all_trunc, all_len, failures, rounds, seen, passed, flops = [], [], [], {}, 0, 0, 0, 0
    while len(groups) < B and rounds < f.max_rounds:
        rounds += 1
        rate = passed / seen if seen else (pass_rate if f.enabled else None)
        need = B - len(groups)
        # the iteration samples at most what max_rounds rounds of B prompts would, but any round may sample `need`
        most = min(max(need, B * f.max_rounds - seen), len(prompts))
        count = prompts_to_sample(need, rate, most=most)
        idx = buffered + stream.take(count - len(buffered), exclude=buffered)
        new, new_failures = rollout_round(
            engine, pool, prompts, idx, k=k, seed=generation_seed(cfg.train.seed, step, rounds, d.rank),
            d=d, timer=timer, tok=tok,
        )  # fmt: skip
        flops += _own_generation_flops(engine.config, prompts, new, d)
        with timer("filter"):
            acc = torch.tensor([a for g in new for a in g.acc])
            trunc = torch.tensor([t for g in new for t in g.truncated])
            all_acc.append(acc)
            all_trunc.append(trunc)
            all_len += [len(r) for g in new for r in g.responses]
            for kind, c in new_failures.items():
                failures[kind] = failures.get(kind, 0) + c
            if f.enabled:
                keep = group_filter_mask(
                    acc, k=k, lo=f.lo, hi=f.hi, truncated=trunc, drop_truncated=f.drop_truncated
                )
            else:
                keep = torch.ones(len(new), dtype=torch.bool)
            buffer_passed += int(keep[: len(buffered)].sum())
            buffered = []
            ok = [g for g, kp in zip(new, keep.tolist()) if kp]
            seen, passed = seen + len(new), passed + len(ok)
            groups += ok[:need]
            buffer.add([g.prompt for g in ok[need:]])
    stats = {
        "filter/pass_rate": passed / max(seen, 1),
        "filter/rounds": rounds,
        "filter/from_buffer": from_buffer,
        "filter/from_buffer_passed": buffer_passed,
        "filter/buffer_size": len(buffer),
        "filter/missing_groups": B - len(groups),
        "rollout/responses": len(all_len),
        "rollout/tokens": sum(all_len),
        "perf/rollout_flops": flops,
        "verify/failures": sum(failures.values()),
        **{f"verify/failures_{kind}": c for kind, c in failures.items()},
    }
    if all_len:
        stats.update(_rollout_stats(torch.cat(all_acc), torch.cat(all_trunc), all_len, k))
    if len(groups) < B:
        stats["filter/max_rounds_hit"] = 1
    return groups, stats


def _rollout_stats(acc: Tensor, trunc: Tensor, lengths: list[int], k: int) -> dict[str, float]:
    """Every rollout of the iteration, before the filter: outcome scores, response lengths, truncation."""
    lens = torch.tensor(lengths, dtype=torch.float64)
    return {
        **outcome_stats(acc, k=k),
        "response/length_mean": float(lens.mean()),
        "response/length_max": float(lens.max()),
        "response/truncation_rate": float(trunc.float().mean()),
    }
