"""Structural memory checks: record the size of every tensor an op allocates while code runs.

    with AllocationRecorder() as rec:
        loss = fused_op(...); loss.backward()
    assert rec.largest().numel < n_tokens * n_vocab, rec.describe()

Works on any device, including "meta" (shapes without storage), so a shape whose logits would take GBs can be
checked in milliseconds. Views are not counted: they allocate nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class Allocation:
    op: str
    shape: tuple[int, ...]
    numel: int


class AllocationRecorder(TorchDispatchMode):
    """Records every tensor returned by an aten op that does not share storage with one of the op's inputs.

    `numel` is the size of the new storage in elements, so broadcast views (expand) count as what they hold."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[Allocation] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        input_storages = {_storage_key(t) for t in inputs}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _storage_key(t) not in input_storages:
                numel = t.untyped_storage().nbytes() // max(1, t.element_size())
                self.allocations.append(Allocation(str(func), tuple(t.shape), numel))
        return out

    def largest(self) -> Allocation:
        """The allocation with the most elements (a 0-element placeholder when nothing was recorded)."""
        return max(self.allocations, key=lambda a: a.numel, default=Allocation("none", (), 0))

    def at_least(self, numel: int) -> list[Allocation]:
        """All allocations with at least `numel` elements."""
        return [a for a in self.allocations if a.numel >= numel]

    def describe(self, k: int = 5) -> str:
        """The k largest allocations, for failure messages."""
        top = sorted(self.allocations, key=lambda a: a.numel, reverse=True)[:k]
        return "; ".join(f"{a.op} {a.shape} ({a.numel:,} elements)" for a in top)


def _storage_key(t: torch.Tensor) -> int:
    # The address of the C++ StorageImpl: shared by views, distinct for every allocation, also on "meta"
    # where all data pointers are 0.
    return t.untyped_storage()._cdata
