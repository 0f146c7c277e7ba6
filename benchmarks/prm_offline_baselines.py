"""Issue 12, part 1: how well do trivial features rank a group's responses? The bar an implicit PRM must clear.

    OMP_NUM_THREADS=1 python benchmarks/prm_offline_baselines.py --pool runs/prm_offline

Features of each response: length, truncation, and the SFT (= reference) model's own log-probs of the sampled
tokens (sum, mean, min). Each feature's orientation (higher = better or worse) is chosen on the train split's
mixed groups; pairwise accuracy (trainer/process_rewards.py) and AUC are reported on the held-out mixed groups,
the same responses `prm_offline.py` evaluates.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch

from fastprime.trainer.demo import build_tiny_model, build_tokenizer

try:
    from prm_offline import groups_of, load_pool, per_token, ranking
except ImportError:
    from benchmarks.prm_offline import groups_of, load_pool, per_token, ranking


def pairwise_ties_half(score: torch.Tensor, acc: torch.Tensor, k: int) -> tuple[float, float]:
    """(pairwise accuracy with a score tie counted as 1/2, fraction of tied pairs) over pairs with different acc;
    prm_pairwise_accuracy counts a tie as wrong, which sinks discrete features such as length."""
    s, a = score.double().view(-1, k), acc.double().view(-1, k)
    ds, da = s[:, :, None] - s[:, None, :], a[:, :, None] - a[:, None, :]
    pair = torch.triu(torch.ones(k, k, dtype=torch.bool), 1) & (da != 0)
    right = (torch.sign(ds) == torch.sign(da)).double() + 0.5 * (ds == 0).double()
    return float(right[pair].mean()), float((ds == 0)[pair].double().mean())


def features(items: list[dict], logps: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "length": torch.tensor([float(len(it["response_ids"])) for it in items]),
        "truncated": torch.tensor([float(it["truncated"]) for it in items]),
        "sft_sum_logp": torch.stack([lp.sum() for lp in logps]),
        "sft_mean_logp": torch.stack([lp.mean() for lp in logps]),
        "sft_min_logp": torch.stack([lp.min() for lp in logps]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", default="runs/prm_offline")
    ap.add_argument("--max-eval", type=int, default=2000)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pool_dir = pathlib.Path(args.pool)
    k, items = load_pool(pool_dir)
    tok = build_tokenizer()
    sft = build_tiny_model(tok, seed=0)
    sft.load_state_dict(torch.load(pool_dir / "sft.pt"))
    train = [it for g in groups_of(items, k, "train", mixed_only=True)[:500] for it in g]
    held = [it for g in groups_of(items, k, "heldout", mixed_only=True) for it in g][: args.max_eval]
    f_train = features(train, per_token(sft, train, tok.pad_token_id))
    f_held = features(held, per_token(sft, held, tok.pad_token_id))
    acc_train = torch.tensor([it["acc"] for it in train])
    acc_held = torch.tensor([it["acc"] for it in held])
    out = {}
    for name in f_train:
        sign = 1.0 if ranking(f_train[name], acc_train, k)["pairwise"] >= 0.5 else -1.0
        half, ties = pairwise_ties_half(sign * f_held[name], acc_held, k)
        out[name] = {"orientation": "higher is better" if sign > 0 else "lower is better",
                     **ranking(sign * f_held[name], acc_held, k), "pairwise_ties_half": half, "tied_pairs": ties}  # fmt: skip
        print(f"{name:14s} ({out[name]['orientation']}): held-out pairwise {out[name]['pairwise']:.3f} "
              f"(ties as 1/2: {half:.3f}, tied {ties:.2f}), AUC {out[name]['auc']:.3f}")  # fmt: skip
    print(
        f"{len(held)} held-out responses in {len(held) // k} mixed groups; orientation from {len(train)} train"
    )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
