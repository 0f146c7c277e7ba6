"""The core's contract (core.py): what logprobs_forward / logprobs_backward return, and which Function runs."""

import pytest
import torch
from oracle import assert_close, make_inputs

from fastprime.kernels import linear_logprobs
from fastprime.kernels.core import HeadOptions, logprobs_backward, logprobs_forward


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_core_contract(impl):
    """logprobs_forward returns (logp, entropy or None, lse); backward honours needs_input_grad."""
    hidden, weight, bias, targets = make_inputs(10, 16, 1000, seed=10)
    opts = HeadOptions(temperature=1.5, ignore_index=-100, impl=impl)
    logp, entropy, lse = logprobs_forward(hidden, weight, targets, bias, opts, need_entropy=False)
    assert entropy is None and logp.dtype == lse.dtype == torch.float32
    ref_lse = torch.logsumexp((hidden.double() @ weight.double().T + bias.double()) / 1.5, -1)
    assert_close(f"{impl} lse", lse, ref_lse, 2e-5)
    grads = logprobs_backward(
        hidden,
        weight,
        targets,
        bias,
        lse,
        None,
        torch.ones_like(logp),
        None,
        opts,
        needs_input_grad=(False, True, False),
    )
    assert grads[0] is None and grads[2] is None and grads[1].shape == weight.shape


def graph_node_names(t):
    """Names of all autograd nodes behind t."""
    names, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(fn for fn, _ in node.next_functions)
    return names


def test_env_var_selects_impl(monkeypatch):
    """FASTPRIME_KERNEL_IMPL=reference is visible: the reference path's graph holds no custom Function."""
    hidden, weight, bias, targets = make_inputs(4, 16, 1000, seed=12)
    h = hidden.clone().requires_grad_()
    monkeypatch.setenv("FASTPRIME_KERNEL_IMPL", "reference")
    assert "LinearLogprobsFunctionBackward" not in graph_node_names(linear_logprobs(h, weight, targets))
    monkeypatch.setenv("FASTPRIME_KERNEL_IMPL", "chunked")
    assert "LinearLogprobsFunctionBackward" in graph_node_names(linear_logprobs(h, weight, targets))
