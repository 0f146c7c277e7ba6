"""Atomic checkpoints with torch.distributed.checkpoint (DCP), exact resume, and HF export of the policy.

A checkpoint is the folder `<run>/checkpoints/step_<8 digits>` holding:
- DCP shards of every model (policy, PRM, reference) and optimizer (policy, PRM), each rank writing its own;
- `trainer_state.pt`: the step, data position, refill buffer, counters (rank 0's, identical on all ranks);
- `rng_rank<r>.pt`: each rank's torch / CUDA / Python RNG states.
Everything is written to `step_<n>.tmp` first and renamed once all ranks finished, so a crash mid-write never
leaves a folder that looks complete; `latest_checkpoint` ignores `.tmp` folders.
"""

from __future__ import annotations

import pathlib
import random
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _dcp_state(
    models: dict[str, nn.Module], optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]]
) -> dict:
    state = {f"model.{k}": get_model_state_dict(m) for k, m in models.items()}
    for k, (m, opt) in optimizers.items():
        state[f"optim.{k}"] = get_optimizer_state_dict(m, opt)
    return state


def save_checkpoint(
    root: str | pathlib.Path,
    step: int,
    *,
    models: dict[str, nn.Module],
    optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
    trainer_state: dict,
    keep: int = 2,
) -> pathlib.Path:
    """Write checkpoint `root/step_<step>` atomically (a collective: every rank calls it); prune to `keep` newest."""
    root = pathlib.Path(root)
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted write
    _barrier()
    dcp.save(_dcp_state(models, optimizers), checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    if _rank() == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def list_checkpoints(root: str | pathlib.Path) -> list[pathlib.Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = pathlib.Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(root: str | pathlib.Path) -> pathlib.Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(
    path: str | pathlib.Path,
    *,
    models: dict[str, nn.Module],
    optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
) -> dict:
    """Restore models, optimizers and this rank's RNG from `path` in place; returns the trainer state dict."""
    path = pathlib.Path(path)
    if not (path / "trainer_state.pt").is_file():
        raise ValueError(f"{str(path)!r} is not a complete fastprime checkpoint (no trainer_state.pt)")
    state = _dcp_state(models, optimizers)
    dcp.load(state, checkpoint_id=str(path))
    for k, m in models.items():
        set_model_state_dict(m, state[f"model.{k}"])
    for k, (m, opt) in optimizers.items():
        set_optimizer_state_dict(m, opt, state[f"optim.{k}"])
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(path / "trainer_state.pt", weights_only=False)


def export_hf(model: nn.Module, tokenizer, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Save an unsharded HF model and its tokenizer so `from_pretrained(out_dir)` loads them (rank 0 only; atomic)."""
    out_dir = pathlib.Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
