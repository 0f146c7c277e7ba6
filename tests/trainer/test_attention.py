"""trainer/attention.py's packed causal attention against an fp64 eager reference, forward and backward."""

import pytest
import torch

from fastprime.trainer.attention import choose_strategy, packed_causal_attention


def _reference(q, k, v, lengths, scale):
    """Plain softmax attention of each sequence alone, in fp64, query heads grouped over the KV heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    outs, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        scores = (q[:, :, s] @ k[:, :, s].transpose(-1, -2)) * scale
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        outs.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, :, s])
        start += n
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("strategy", ["per_sequence", "padded"])
def test_packed_attention_and_its_gradients_equal_each_sequence_alone(strategy):
    lengths = [5, 1, 9, 3, 7]
    g = torch.Generator().manual_seed(0)
    H, Hkv, N, d = 4, 2, sum(lengths), 8
    q, k, v = (torch.randn(1, h, N, d, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    grad_out = torch.randn(1, H, N, d, generator=g, dtype=torch.float64)
    scale = d**-0.5

    def out_and_grads(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad_out.to(dtype))
        return [out.detach().double()] + [x.grad.double() for x in leaves]

    want = out_and_grads(lambda *x: _reference(*x, lengths, scale), torch.float64)
    got = out_and_grads(
        lambda *x: packed_causal_attention(*x, lengths, scale=scale, strategy=strategy), torch.float32
    )
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_choose_strategy_by_count_and_padding_waste():
    assert choose_strategy([50] * 4) == "per_sequence"  # few sequences: one call each is cheap
    assert choose_strategy([50] * 32) == "padded"  # many alike: one batched call
    assert choose_strategy([1] * 31 + [200]) == "per_sequence"  # padding all to 200 would waste ~30x
