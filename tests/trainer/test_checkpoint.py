"""Checkpoints: atomic folders, exact round trip of weights, optimizer, RNG and trainer state; NaN steps skipped."""

import math

import torch
from torch import nn

from fastprime.trainer.checkpoint import (
    ModelState,
    OptimizerState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from fastprime.trainer.filtering import RefillBuffer
from fastprime.trainer.passes import clip_and_step
from fastprime.trainer.train import TrainState


def _model_and_opt(seed: int):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)
    return m, opt


def _train_step(m, opt):
    m(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_round_trip_is_exact_and_atomic(tmp_path):
    m, opt = _model_and_opt(0)
    _train_step(m, opt)
    buf = RefillBuffer()
    buf.add([{"prompt": 3, "responses": [[1, 2]], "acc": [1.0]}])
    (tmp_path / "ck" / "step_00000007.tmp").mkdir(parents=True)  # an interrupted write: never a checkpoint
    state = TrainState(step=5, skipped_steps=2, initial_eval=0.25)
    components = {"model.m": ModelState(m), "optim.m": OptimizerState(m, opt), "buffer": buf, "state": state}
    save_checkpoint(tmp_path / "ck", 5, components)
    assert latest_checkpoint(tmp_path / "ck").name == "step_00000005"
    next_rand = torch.rand(3)
    x = torch.randn(5, 4)
    m(x).square().mean().backward()  # the uninterrupted next step
    opt.step()

    m2, opt2 = _model_and_opt(1)  # different weights, fresh optimizer
    buf2, state2 = RefillBuffer(), TrainState()
    components2 = {
        "model.m": ModelState(m2),
        "optim.m": OptimizerState(m2, opt2),
        "buffer": buf2,
        "state": state2,
    }
    load_checkpoint(tmp_path / "ck" / "step_00000005", components2)
    assert torch.equal(torch.rand(3), next_rand), "RNG state not restored"
    assert state2 == state
    assert buf2.take(5) == [{"prompt": 3, "responses": [[1, 2]], "acc": [1.0]}]
    m2(x).square().mean().backward()  # the resumed next step: bitwise equal only if Adam's moments came back
    opt2.step()
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after resume"


def test_keep_prunes_oldest(tmp_path):
    m, opt = _model_and_opt(0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"model.m": ModelState(m), "optim.m": OptimizerState(m, opt)}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]


def test_non_finite_step_is_skipped_and_counted():
    m, opt = _model_and_opt(0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(5, 4)).square().mean().backward()
    m[0].weight.grad[0, 0] = float("nan")
    norm, skipped = clip_and_step(m, opt, max_norm=1.0, loss=0.5)
    assert skipped and math.isnan(norm)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()), (
        "a NaN step must not touch weights"
    )
    assert all(p.grad is None for p in m.parameters()), "the bad gradient must be dropped"
    m(torch.randn(5, 4)).square().mean().backward()
    _, skipped = clip_and_step(m, opt, max_norm=1.0, loss=float("inf"))
    assert skipped
    m(torch.randn(5, 4)).square().mean().backward()
    norm, skipped = clip_and_step(m, opt, max_norm=1.0, loss=0.5)
    assert not skipped and math.isfinite(norm)
    assert not torch.equal(before["0.weight"], m.state_dict()["0.weight"])
