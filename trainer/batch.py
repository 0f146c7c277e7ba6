"""The typed hand-offs between phases: a `Group` (one prompt's K responses) and the `Batch` built from groups.

Rollout and verification produce groups (the filter keeps or drops whole groups, the refill buffer stores
them); the model passes, the PRM and the advantages work on one `Batch` of n = groups * K responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastprime.trainer.data import Prompt


@dataclass
class Group:
    """One prompt's K sampled responses and their outcome scores."""

    prompt: int  # index of the prompt in the run's prompt list
    responses: list[list[int]]  # K response token id lists (ending with EOS unless truncated)
    truncated: list[bool]  # [K] True where a response hit the length limit
    acc: list[float]  # [K] verifier scores in [0, 1]
    logprobs: list[list[float]] | None = None  # [K][len] the engine's sampling log-probs (vllm), else None
    seed: int = -1  # generation seed of the rollout round that sampled it (-1: not recorded)


@dataclass
class Batch:
    """n = groups * k responses, grouped by prompt. prompts/responses: token id lists; acc [n]; mask [n, T]."""

    prompts: list[list[int]]
    responses: list[list[int]]
    acc: Tensor
    truncated: Tensor
    k: int
    # [n] the engine's sampling log-probs of each response's tokens; None where no response has them (the hf
    # engine reports none); only the engine/trainer agreement check reads them
    sample_logprobs: list[list[float] | None] | None = None

    @classmethod
    def from_groups(cls, groups: list[Group], prompts: Sequence[Prompt], *, k: int) -> Batch:
        """The batch of `groups` in order; prompts[g.prompt] is group g's prompt (repeated K times)."""
        return cls(
            prompts=[prompts[g.prompt].prompt_ids for g in groups for _ in range(k)],
            responses=[r for g in groups for r in g.responses],
            acc=torch.tensor([a for g in groups for a in g.acc], dtype=torch.float32),
            truncated=torch.tensor([t for g in groups for t in g.truncated]),
            k=k,
            sample_logprobs=[lp for g in groups for lp in (g.logprobs or [None] * k)]
            if any(g.logprobs for g in groups)
            else None,
        )

    @property
    def n(self) -> int:
        return len(self.responses)

    @property
    def num_tokens(self) -> int:
        """Tokens through the model in one pass: prompt + response, less the last (it predicts nothing)."""
        return sum(len(p) + len(r) - 1 for p, r in zip(self.prompts, self.responses))

    @property
    def mask(self) -> Tensor:
        T = max(len(r) for r in self.responses)
        lengths = torch.tensor([len(r) for r in self.responses])
        return torch.arange(T)[None, :] < lengths[:, None]
