"""fastprime's PRIME trainer: `python trainer/main.py [--config FILE.yaml] [--section.key value ...]`.

With no arguments it runs the built-in demo (configs/demo.yaml). Under `torchrun` there is one process per
device; plain `python` is the same code with a process group of one. The run itself is in train.py.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys

# `python trainer/main.py` puts trainer/ first on sys.path, where e.g. data.py would shadow other packages.
if sys.path and pathlib.Path(sys.path[0]).resolve() == pathlib.Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch.distributed as dist  # noqa: E402

from fastprime.trainer.config import SetupError, load_config  # noqa: E402
from fastprime.trainer.models import init_distributed  # noqa: E402
from fastprime.trainer.passes import Dist  # noqa: E402
from fastprime.trainer.train import train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(argv)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    rank, world, device = init_distributed()
    # Progress messages of the pieces (warm start, verifiers) on rank 0's console.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    # sdpa/eager run as trainer/attention.py's packed backend, which reads shared prompts from the positions;
    # transformers' flash-attn varlen path does not (packing.py)
    share = cfg.model.attn_implementation in ("sdpa", "eager")
    d = Dist(
        rank=rank, world=world, device=device, token_budget=cfg.train.micro_batch_tokens, share_prompts=share
    )
    try:
        train(cfg, d)
        if dist.is_initialized():  # a vllm engine's shutdown already ended the group (after its own barrier)
            dist.barrier()  # ranks tear gloo/NCCL down together, not while a peer still writes its plot and summary
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
