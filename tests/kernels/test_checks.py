"""Input checks (checks.py): implementation choice and one clear ValueError per bad input."""

import pytest
import torch
from oracle import make_inputs

from fastprime.kernels import linear_logprobs
from fastprime.kernels.checks import resolve_impl


def test_resolve_impl(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("FASTPRIME_KERNEL_IMPL", raising=False)
    assert resolve_impl("auto", cpu) == "chunked"
    assert resolve_impl("triton", cpu) == "triton"
    rows = torch.zeros(2048, 128)
    assert resolve_impl("auto", rows, 32) == "reference", "a tiny head on CPU runs eager"
    assert resolve_impl("auto", rows, 1024) == "chunked"
    assert resolve_impl("auto", torch.zeros(1 << 20, 1), 32) == "chunked", "too many logits for eager"
    monkeypatch.setenv("FASTPRIME_KERNEL_IMPL", "reference")
    assert resolve_impl("auto", cpu) == "reference"
    assert resolve_impl("chunked", cpu) == "chunked", "an explicit impl wins over the environment"
    monkeypatch.setenv("FASTPRIME_KERNEL_IMPL", "fast")
    with pytest.raises(ValueError, match="fast"):
        resolve_impl("auto", cpu)
    with pytest.raises(ValueError, match="cuda"):
        resolve_impl("cuda", cpu)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.update(hidden=a["hidden"][:, :7]), "disagree on D"),
        (lambda a: a.update(weight=a["weight"][None]), "weight must have shape"),
        (lambda a: a.update(targets=a["targets"][:3]), "targets shape"),
        (lambda a: a.update(targets=a["targets"].float()), "integer"),
        (lambda a: a.update(targets=torch.full_like(a["targets"], 1000)), "found 1000"),
        (lambda a: a.update(targets=torch.full_like(a["targets"], -5)), "found -5"),
        (lambda a: a.update(bias=a["bias"][:10]), "bias shape"),
        (lambda a: a.update(weight=a["weight"].half()), "must match"),
        (lambda a: a.update(hidden=a["hidden"].int(), weight=a["weight"].int()), "dtype"),
        (lambda a: a.update(temperature=0.0), "temperature"),
        (lambda a: a.update(temperature=float("nan")), "temperature"),
        (lambda a: a.update(impl="cuda"), "impl='cuda'"),
    ],
)
def test_bad_inputs_raise_value_error(change, match):
    hidden, weight, bias, targets = make_inputs(6, 16, 1000, seed=13)
    args = dict(hidden=hidden, weight=weight, targets=targets, bias=bias, temperature=1.0, impl="chunked")
    change(args)
    with pytest.raises(ValueError, match=match):
        linear_logprobs(
            args["hidden"], args["weight"], args["targets"], bias=args["bias"],
            temperature=args["temperature"], impl=args["impl"],
        )  # fmt: skip
