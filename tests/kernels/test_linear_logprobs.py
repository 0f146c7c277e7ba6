"""linear_logprobs vs an independent fp64 eager computation, for every impl."""

import pytest
import torch
from fastprime.kernels import linear_logprobs


def fp64_logprobs(hidden, weight, targets, bias, temperature, ignore_index):
    """Independent oracle: float64 logits, plain torch."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
    logprobs = torch.log_softmax(z, -1)
    keep = targets != ignore_index
    logp = logprobs.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_fp64_gradcheck(impl):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (6,), generator=g)
    t[1] = -100
    fn = lambda h, w, b: linear_logprobs(h, w, t, bias=b, temperature=0.7, return_entropy=True, impl=impl)
    assert torch.autograd.gradcheck(fn, (h, w, b))
