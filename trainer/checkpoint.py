"""Atomic checkpoints with torch.distributed.checkpoint (DCP), exact resume, and HF export of the policy.

A checkpoint is a dict of stateful components (anything with `state_dict` / `load_state_dict`, torchtitan
style), written to the folder `<run>/checkpoints/step_<8 digits>`:
- `ModelState` / `OptimizerState` components (policy, PRM, reference; their optimizers) as DCP shards, each
  rank writing its own;
- every other component (the step counters, data position, refill buffer: identical on all ranks) in
  `trainer_state.pt`, rank 0's copy;
- `rng_rank<r>.pt`: each rank's torch / CUDA / Python RNG states.
Everything is written to `step_<n>.tmp` first and renamed once all ranks finished, so a crash mid-write never
leaves a folder that looks complete; `latest_checkpoint` ignores `.tmp` folders.
"""

from __future__ import annotations

import pathlib
import random
import re
import shutil
from typing import Protocol

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

from fastprime.trainer.config import Config, SetupError

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> None: ...


class ModelState:
    """A (sharded) model as a checkpoint component: DCP saves and loads its shards in place."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState:
    """An optimizer of a (sharded) model as a checkpoint component."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


def _split(components: dict[str, Stateful]) -> tuple[dict[str, Stateful], dict[str, Stateful]]:
    """(components DCP shards, components pickled whole in trainer_state.pt)."""
    sharded = {k: c for k, c in components.items() if isinstance(c, (ModelState, OptimizerState))}
    return sharded, {k: c for k, c in components.items() if k not in sharded}


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


def save_checkpoint(
    root: str | pathlib.Path,
    step: int,
    components: dict[str, Stateful],
    *,
    keep: int = 2,
) -> pathlib.Path:
    """Write checkpoint `root/step_<step>` atomically (a collective: every rank calls it); prune to `keep` newest."""
    root = pathlib.Path(root)
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted write
    _barrier()
    sharded, whole = _split(components)
    dcp.save(sharded, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    if _rank() == 0:
        torch.save({k: c.state_dict() for k, c in whole.items()}, tmp / "trainer_state.pt")
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


def load_checkpoint(path: str | pathlib.Path, components: dict[str, Stateful]) -> None:
    """Restore every component and this rank's RNG from `path`, in place."""
    path = pathlib.Path(path)
    if not (path / "trainer_state.pt").is_file():
        raise ValueError(f"{str(path)!r} is not a complete fastprime checkpoint (no trainer_state.pt)")
    sharded, whole = _split(components)
    dcp.load(sharded, checkpoint_id=str(path))  # calls each component's load_state_dict
    saved = torch.load(path / "trainer_state.pt", weights_only=False)
    for k, c in whole.items():
        c.load_state_dict(saved[k])
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))


def choose_run_dir(cfg: Config, rank: int) -> tuple[pathlib.Path, pathlib.Path | None]:
    """(run folder, checkpoint to resume from or None). A fresh run never overwrites one that has checkpoints."""
    run_dir = cfg.run_dir
    if cfg.run.resume == "auto":
        return run_dir, latest_checkpoint(run_dir / "checkpoints")
    if cfg.run.resume:
        path = pathlib.Path(cfg.run.resume)
        if not (path / "trainer_state.pt").is_file():
            raise SetupError(
                f"run.resume={cfg.run.resume!r} is not a checkpoint folder (no trainer_state.pt)"
            )
        return path.parent.parent, path
    chosen = [run_dir]
    if rank == 0:  # one decision for all ranks
        i = 2
        while latest_checkpoint(chosen[0] / "checkpoints") is not None:
            chosen[0] = run_dir.with_name(f"{run_dir.name}-{i}")
            i += 1
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0], None


def export_hf(
    model: nn.Module, tokenizer, out_dir: str | pathlib.Path, *, state_dict: dict | None = None
) -> pathlib.Path:
    """Save an HF model and its tokenizer so `from_pretrained(out_dir)` loads them (rank 0 only; atomic).

    state_dict: the full weights to save instead of `model`'s own (a sharded model's `full_state_dict`)."""
    out_dir = pathlib.Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
