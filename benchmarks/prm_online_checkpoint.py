"""Issue 12, part 1: inspect the PRM and reference of a `trainer/main.py` checkpoint against the offline pool.

    OMP_NUM_THREADS=1 python benchmarks/prm_online_checkpoint.py --pool runs/prm_offline \
        --checkpoint runs/prm_offline/online/live/checkpoints/step_00000030

Converts the DCP checkpoint to one torch file, then (1) checks that the reference is still the SFT weights the
run started from (largest |difference| per model), and (2) measures the online PRM's pairwise accuracy / AUC on
the pool's held-out mixed groups (samples of the SFT policy, q against the SFT reference): does the PRM the
online run trained rank a fixed, policy-independent set of responses?
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from fastprime.trainer.demo import build_tiny_model, build_tokenizer

try:
    from prm_offline import evaluate, groups_of, load_pool, per_token
except ImportError:
    from benchmarks.prm_offline import evaluate, groups_of, load_pool, per_token


def model_state(full: dict, name: str) -> dict[str, torch.Tensor]:
    """The HF state dict of model `name` ('policy', 'prm', 'ref') from a converted trainer checkpoint."""
    sd = full[f"model.{name}"] if f"model.{name}" in full else {
        k.removeprefix(f"model.{name}."): v for k, v in full.items() if k.startswith(f"model.{name}.")
    }  # fmt: skip
    return {k.removeprefix("lm."): v for k, v in sd.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", default="runs/prm_offline")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--json", default="")
    ap.add_argument("--save-prm", default="", help="also save the PRM's HF state dict here (.pt)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pool_dir = pathlib.Path(args.pool)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(args.checkpoint, f"{tmp}/ckpt.pt")
        full = torch.load(f"{tmp}/ckpt.pt", weights_only=False)
    sft = torch.load(pool_dir / "sft.pt")
    out = {"checkpoint": args.checkpoint}
    for name in ("ref", "prm", "policy"):
        sd = model_state(full, name)
        diff = max(float((sd[k].float() - v).abs().max()) for k, v in sft.items() if k in sd)
        out[f"{name}_max_abs_diff_from_sft"] = diff
        print(f"{name}: {len(sd)} tensors, max |w - w_sft| = {diff:.3e}")
    k, items = load_pool(pool_dir)
    tok = build_tokenizer()
    held = [it for g in groups_of(items, k, "heldout", mixed_only=True) for it in g]
    ref = build_tiny_model(tok, seed=0)
    ref.load_state_dict(sft)
    ref_lp = per_token(ref, held, tok.pad_token_id)
    prm = build_tiny_model(tok, seed=0)
    prm.load_state_dict(model_state(full, "prm"), strict=False)
    if args.save_prm:
        torch.save(prm.state_dict(), args.save_prm)
    out["prm_on_sft_samples"] = r = evaluate(prm, held, ref_lp, tok.pad_token_id, k, 1.0)
    print(
        f"online PRM on the SFT pool's held-out mixed groups: pairwise {r['pairwise']:.3f} AUC {r['auc']:.3f}"
    )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
