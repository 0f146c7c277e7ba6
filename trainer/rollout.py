"""Rollout engines: sample K responses per prompt with the current policy.

The interface is two calls, so that an in-process vLLM engine (a later issue) can slot in beside `hf`:
`generate(prompts, n=K, seed=...)` and `sync_weights(state_dict)` (the trainer pushes the policy's full
weights after every update). Log-probs are never taken from the engine: the trainer recomputes them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn


@dataclass
class Rollout:
    """One sampled response: token ids (ending with EOS unless truncated) and whether it hit the length limit."""

    response_ids: list[int]
    truncated: bool


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], *, n: int, seed: int) -> list[Rollout]:
        """len(prompts) * n rollouts, grouped by prompt: the n samples of prompt 0 first."""
        ...

    def sync_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Load the policy's current full weights (HF key names)."""
        ...


class HFRolloutEngine:
    """transformers `generate` on an unsharded copy of the policy (temperature, top_p, no top_k, stop at EOS).

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
        if not eos_token_ids:
            raise ValueError("the rollout engine needs at least one EOS token id to stop generation")
        self.eos, self.pad = list(eos_token_ids), pad_token_id
        self.temperature, self.top_p = temperature, top_p
        self.max_new_tokens, self.chunk = max_new_tokens, prompts_per_generate
        self.device = torch.device(device)
        # Tied lm_head/embedding weights appear once in a sharded state dict; loading either key fills both.
        self._tied = (
            {k for k in self.model.state_dict() if k == "lm_head.weight"} if self._is_tied() else set()
        )

    def _is_tied(self) -> bool:
        emb, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        return head is not None and head.weight is emb.weight

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, n: int, seed: int) -> list[Rollout]:
        """Sample n responses to each prompt (ids without padding); deterministic given `seed`."""
        out: list[Rollout] = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.chunk):
                out += self._generate_chunk(prompts[start : start + self.chunk], n)
        return out

    def _generate_chunk(self, prompts: list[list[int]], n: int) -> list[Rollout]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt continues from its last real token
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        seqs = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0,
            num_return_sequences=n,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
            use_cache=True,
        )
        rollouts = []
        for row in seqs[:, width:].tolist():
            stop = next((t for t, tok in enumerate(row) if tok in self.eos), None)
            if stop is not None:
                rollouts.append(Rollout(row[: stop + 1], truncated=False))
            else:
                rollouts.append(Rollout(row[: self.max_new_tokens], truncated=True))
        return rollouts

    @torch.no_grad()
    def sync_weights(self, state_dict: dict[str, Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        missing = set(missing) - self._tied
        if missing or unexpected:
            raise ValueError(
                f"weight sync mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
