"""aggregation_weights against hand-computed weights, and micro-batch accumulation == one big batch."""

import pytest
import torch

from fastprime.kernels import aggregation_weights

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]

# Packed: sequence 0 has 3 valid tokens, sequence 1 has 1, sequence 2 has 2 (one masked), -1 is padding.
SEQ = torch.tensor([0, 0, 0, 1, 2, 2, 2, -1, -1])
MASK = torch.tensor([1, 1, 1, 1, 0, 1, 1, 1, 0])
EXPECTED = {
    "token-mean": [1 / 6] * 4 + [0] + [1 / 6] * 2 + [0, 0],
    "seq-mean-token-mean": [1 / 9] * 3 + [1 / 3] + [0] + [1 / 6] * 2 + [0, 0],
    "seq-mean-token-sum": [1 / 3] * 4 + [0] + [1 / 3] * 2 + [0, 0],
}


@pytest.mark.parametrize("mode", MODES)
def test_packed_matches_hand_computed(mode):
    w = aggregation_weights(MASK, SEQ, mode=mode)
    assert w.dtype == torch.float32 and w.shape == MASK.shape
    torch.testing.assert_close(w, torch.tensor(EXPECTED[mode]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_padded_matches_hand_computed(mode):
    # Rows are sequences: lengths 3, 1, 0 (an empty row does not count as a sequence).
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    expected = {
        "token-mean": [[1 / 4] * 3 + [0], [0, 1 / 4, 0, 0], [0] * 4],
        "seq-mean-token-mean": [[1 / 6] * 3 + [0], [0, 1 / 2, 0, 0], [0] * 4],
        "seq-mean-token-sum": [[1 / 2] * 3 + [0], [0, 1 / 2, 0, 0], [0] * 4],
    }[mode]
    w = aggregation_weights(mask, mode=mode)
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-6, atol=0)
    # The same with explicit seq ids and as a packed input.
    seq = torch.arange(3).unsqueeze(1).expand(3, 4)
    torch.testing.assert_close(aggregation_weights(mask, seq, mode=mode), w)
    torch.testing.assert_close(
        aggregation_weights(mask.reshape(-1), seq.reshape(-1), mode=mode), w.reshape(-1)
    )


def test_global_normalisers_and_empty_input():
    w = aggregation_weights(MASK, SEQ, mode="token-mean", num_tokens=12)
    torch.testing.assert_close(w, torch.tensor(EXPECTED["token-mean"]) * 6 / 12)
    w = aggregation_weights(MASK, SEQ, mode="seq-mean-token-sum", num_seqs=torch.tensor(6.0))
    torch.testing.assert_close(w, torch.tensor(EXPECTED["seq-mean-token-sum"]) * 3 / 6)
    empty = aggregation_weights(torch.zeros(5), torch.zeros(5, dtype=torch.long), mode="seq-mean-token-mean")
    assert torch.equal(empty, torch.zeros(5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="mean"), "mode"),
        (dict(mode="token-mean", num_seqs=3), "num_seqs=3"),
        (dict(mode="seq-mean-token-sum", num_tokens=3), "num_tokens=3"),
        (dict(mode="token-mean", num_tokens=0), "num_tokens must be positive, got 0"),
        (dict(mode="seq-mean-token-sum", num_seqs=torch.ones(2)), "num_seqs must be a scalar"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        aggregation_weights(MASK, SEQ, **kwargs)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="seq_ids is required"):
        aggregation_weights(MASK)
    with pytest.raises(ValueError, match="shape"):
        aggregation_weights(MASK, SEQ[:-1])
    with pytest.raises(ValueError, match="integer"):
        aggregation_weights(MASK, SEQ.float())


@pytest.mark.parametrize("mode", MODES)
def test_microbatch_accumulation_equals_whole_batch(mode):
    """Splitting a mini-batch into micro-batches (whole sequences each) and summing the losses computed with the
    global normaliser gives the whole batch's loss and gradients."""
    g = torch.Generator().manual_seed(0)
    lengths = [1, 7, 3, 12, 2, 5]
    seq = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])
    mask = (torch.rand(seq.shape, generator=g) > 0.2).long()
    mask[0] = 1
    x = torch.randn(seq.shape[0], 4, generator=g, dtype=torch.float64)
    theta = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    term = lambda rows: torch.tanh(x[rows] @ theta) ** 2  # any per-token loss term

    whole = (aggregation_weights(mask, seq, mode=mode).double() * term(slice(None))).sum()
    (grad_whole,) = torch.autograd.grad(whole, theta)

    valid = mask.bool()
    if mode == "token-mean":
        norm = dict(num_tokens=int(valid.sum()))
    else:
        norm = dict(num_seqs=int(seq[valid].unique().numel()))
    cuts = [0, 1, 11, 25, len(seq)]  # micro-batches at sequence boundaries: [s0], [s1 s2], [s3 s4], [s5]
    total = torch.zeros((), dtype=torch.float64)
    for a, b in zip(cuts[:-1], cuts[1:]):
        w = aggregation_weights(mask[a:b], seq[a:b], mode=mode, **norm).double()
        total = total + (w * term(slice(a, b))).sum()
    (grad_acc,) = torch.autograd.grad(total, theta)
    torch.testing.assert_close(total, whole.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_acc, grad_whole, rtol=1e-12, atol=0)
