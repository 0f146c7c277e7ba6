"""decode.py's ReservedLayer holds what transformers' DynamicLayer holds: the same keys and values after a prefill,
single-position steps past its reserve (it doubles), rows copied per sample and finished rows dropped."""

import torch
from transformers.cache_utils import DynamicLayer

from fastprime.trainer.decode import ReservedLayer


def test_reserved_layer_holds_what_dynamic_layer_holds():
    g = torch.Generator().manual_seed(0)
    reserved, dynamic = ReservedLayer(capacity=4), DynamicLayer()

    def step(rows: int, positions: int):
        k, v = (torch.randn(rows, 2, positions, 8, generator=g) for _ in range(2))
        got, want = reserved.update(k, v), dynamic.update(k, v)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert reserved.get_seq_length() == dynamic.get_seq_length()

    step(rows=3, positions=6)  # a prefill longer than the reserve asked for
    for layer in (reserved, dynamic):
        layer.batch_repeat_interleave(2)
    for _ in range(9):
        step(rows=6, positions=1)
    keep = torch.tensor([0, 2, 5])
    for layer in (reserved, dynamic):
        layer.batch_select_indices(keep)
    for _ in range(10):
        step(rows=3, positions=1)
    assert reserved.get_seq_length() == 25
    assert reserved.capacity == 48  # 6 (the prefill) doubled at positions 7, 13 and 25
