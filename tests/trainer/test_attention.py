"""trainer/attention.py's packed causal attention against an fp64 eager reference, forward and backward."""

import pytest
import torch

from fastprime.trainer import attention
from fastprime.trainer.attention import packed_causal_attention, segments_from_positions


def _reference(q, k, v, segments, scale):
    """Plain softmax attention in fp64, query heads grouped over the KV heads: each segment's queries against its
    own keys (causal), after the first p keys of its prompt (the last segment with prefix 0) when p > 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    outs, start, root = [], 0, 0
    for n, p in segments:
        root = start if p == 0 else root
        keys = torch.cat([torch.arange(root, root + p), torch.arange(start, start + n)])
        scores = (q[:, :, start : start + n] @ k[:, :, keys].transpose(-1, -2)) * scale
        causal = torch.ones(n, p + n, dtype=torch.bool).tril(diagonal=p)
        outs.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, :, keys])
        start += n
    return torch.cat(outs, dim=2)


LAYOUTS = {
    "sequences": [(5, 0), (1, 0), (9, 0), (3, 0), (7, 0)],
    # prompt+first response, then responses continuing its first 4 tokens (one of length 1); a second group
    "shared prompts": [(6, 0), (3, 4), (1, 4), (5, 4), (8, 0), (2, 3), (4, 0)],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("group_mask", [True, False])
def test_packed_attention_and_its_gradients_equal_each_sequence_alone(layout, group_mask, monkeypatch):
    segments = LAYOUTS[layout]
    if not group_mask:  # a group too large for one [G, G] mask goes one call per segment
        monkeypatch.setattr(attention, "GROUP_MASK_MAX_TOKENS", 0)
    g = torch.Generator().manual_seed(0)
    H, Hkv, N, d = 4, 2, sum(n for n, _ in segments), 8
    q, k, v = (torch.randn(1, h, N, d, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    grad_out = torch.randn(1, H, N, d, generator=g, dtype=torch.float64)
    scale = d**-0.5

    def out_and_grads(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad_out.to(dtype))
        return [out.detach().double()] + [x.grad.double() for x in leaves]

    want = out_and_grads(lambda *x: _reference(*x, segments, scale), torch.float64)
    got = out_and_grads(lambda *x: packed_causal_attention(*x, segments, scale=scale), torch.float32)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_segments_from_positions_by_hand():
    # a 3-token prompt with its first response (2 inputs), a second response (1 input), a lone sequence
    pos = torch.tensor([[0, 1, 2, 3, 4, 3, 0, 1]])
    assert segments_from_positions(pos) == [(5, 0), (1, 3), (2, 0)]
