"""Issue 12: is the live online PRM's q just the RL policy's own drift from the reference?

    OMP_NUM_THREADS=1 python benchmarks/prm_online_drift.py RUNS/prm_offline 300

Samples 4 responses per held-out prompt from the live online run's exported policy (online/live/hf), labels them,
and on the mixed groups ranks by: the policy's drift sum(log pi_policy - log pi_ref), the SFT's and the policy's
sum log-prob, and each saved PRM's sum q (against the SFT reference); plus the correlation of each PRM's sum q
with the drift (over responses, and within groups). Prints JSON.
"""

import json
import pathlib
import sys

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from prm_offline import groups_of, per_token, ranking  # noqa: E402
from prm_offline_pool import label, sample  # noqa: E402

from fastprime.trainer.demo import build_tiny_model, build_tokenizer, make_arithmetic_rows
from fastprime.trainer.verifiers import VerifierPool


def main() -> None:
    torch.set_num_threads(1)
    R = pathlib.Path(sys.argv[1])
    tok = build_tokenizer()
    policy = AutoModelForCausalLM.from_pretrained(
        R / "online/live/hf", dtype=torch.float32, local_files_only=True
    )
    rows = make_arithmetic_rows(int(sys.argv[2]), seed=1, split="test")
    items = sample(policy, tok, rows, k=4, seed=2)
    with VerifierPool(workers=1) as pool:
        label(pool, tok, items)
    for it in items:
        it["split"] = "heldout"
    held = [it for g in groups_of(items, 4, "heldout", mixed_only=True) for it in g]
    acc = torch.tensor([it["acc"] for it in held])

    def load(path):
        m = build_tiny_model(tok, seed=0)
        m.load_state_dict(torch.load(path))
        return m

    ref_lp = per_token(load(R / "sft.pt"), held, tok.pad_token_id)
    pol_lp = per_token(policy, held, tok.pad_token_id)
    out = {"mixed_groups": len(held) // 4, "sample_acc": sum(it["acc"] for it in items) / len(items)}
    drift = torch.stack([(p - r).sum() for p, r in zip(pol_lp, ref_lp)])
    out["policy_drift_sum"] = ranking(drift, acc, 4)
    out["sft_sum_logp"] = ranking(torch.stack([r.sum() for r in ref_lp]), acc, 4)
    out["policy_sum_logp"] = ranking(torch.stack([p.sum() for p in pol_lp]), acc, 4)
    for name in ("online_live_step30", "online_frozen_step30", "lr1e-4_b1"):
        prm_lp = per_token(load(R / "prm" / f"{name}.pt"), held, tok.pad_token_id)
        q = torch.stack([(a - r).sum() for a, r in zip(prm_lp, ref_lp)])
        out[name] = ranking(q, acc, 4)
        out[name]["corr_with_policy_drift"] = float(torch.corrcoef(torch.stack([q, drift]))[0, 1])
        # within-group: correlation of centred values
        qc = (q.view(-1, 4) - q.view(-1, 4).mean(1, keepdim=True)).flatten()
        dc = (drift.view(-1, 4) - drift.view(-1, 4).mean(1, keepdim=True)).flatten()
        out[name]["within_group_corr_with_policy_drift"] = float(torch.corrcoef(torch.stack([qc, dc]))[0, 1])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
