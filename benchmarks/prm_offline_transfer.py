"""Issue 12, part 1: does a PRM trained offline on the SFT policy's samples still rank a later RL policy's samples?

    OMP_NUM_THREADS=1 python benchmarks/prm_offline_transfer.py --pool runs/prm_offline \
        --policy runs/prm_offline/online/live/hf --prm runs/prm_offline/prm/lr1e-4_b1.pt

Samples k responses per held-out prompt (the pool's held-out prompts) from `--policy` (an HF folder, e.g. the
policy a `trainer/main.py` run exported), labels them with the demo verifier, and reports on the mixed groups
the pairwise accuracy / AUC of each PRM's beta Σq (q against the SFT reference) and of the SFT's own sum log-prob.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
from transformers import AutoModelForCausalLM

from fastprime.trainer.demo import build_tiny_model, build_tokenizer, make_arithmetic_rows
from fastprime.trainer.verifiers import VerifierPool

try:
    from prm_offline import evaluate, groups_of, per_token, ranking
    from prm_offline_pool import label, sample
except ImportError:
    from benchmarks.prm_offline import evaluate, groups_of, per_token, ranking
    from benchmarks.prm_offline_pool import label, sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", default="runs/prm_offline")
    ap.add_argument("--policy", required=True)
    ap.add_argument("--prm", action="append", default=[])
    ap.add_argument("--eval-prompts", type=int, default=600)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pool_dir = pathlib.Path(args.pool)
    tok = build_tokenizer()
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32, local_files_only=True)
    rows = make_arithmetic_rows(args.eval_prompts, seed=1, split="test")
    items = sample(policy, tok, rows, k=args.k, seed=2)
    with VerifierPool(workers=1) as pool:
        label(pool, tok, items)
    for it in items:
        it["split"] = "heldout"
    held = [it for g in groups_of(items, args.k, "heldout", mixed_only=True) for it in g]
    acc = torch.tensor([it["acc"] for it in held])
    ref = build_tiny_model(tok, seed=0)
    ref.load_state_dict(torch.load(pool_dir / "sft.pt"))
    ref_lp = per_token(ref, held, tok.pad_token_id)
    out = {
        "policy": args.policy,
        "sample_acc": sum(it["acc"] for it in items) / len(items),
        "mixed_groups": len(held) // args.k,
        "sft_sum_logp": ranking(torch.stack([lp.sum() for lp in ref_lp]), acc, args.k),
    }
    print(f"policy {args.policy}: sample acc {out['sample_acc']:.3f}, {out['mixed_groups']} mixed groups; "
          f"SFT sum logp pairwise {out['sft_sum_logp']['pairwise']:.3f} AUC {out['sft_sum_logp']['auc']:.3f}")  # fmt: skip
    for path in args.prm:
        prm = build_tiny_model(tok, seed=0)
        prm.load_state_dict(torch.load(path))
        out[pathlib.Path(path).stem] = r = evaluate(prm, held, ref_lp, tok.pad_token_id, args.k, 1.0)
        print(f"PRM {path}: pairwise {r['pairwise']:.3f} AUC {r['auc']:.3f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
