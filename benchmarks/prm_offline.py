"""Issue 12, part 1, step 2: train PRIME's implicit PRM offline on a labelled pool and measure what it learns.

    OMP_NUM_THREADS=1 python benchmarks/prm_offline.py --pool runs/prm_offline --lr 1e-4 --beta 1 \
        --epochs 2 --name lr1e-4_b1

PRM and reference both start from the pool's SFT weights (`sft.pt`); q = logp_prm - logp_ref per response token
(temperature 1), loss BCE(sigmoid(beta Σ_t q), acc) averaged over the mini-batch's responses, AdamW (weight
decay 0, betas 0.9/0.999 as torch's default like the trainer's PRM optimizer), grad-norm clip 10. The forward
is plain PyTorch (full logits, log_softmax): an implementation independent of the trainer's fused PRM path.

Training data: the pool's train-split groups, by default only groups with mixed outcomes (what the online
filter keeps: 1-3 correct of 4); `--max-train N` caps the number of responses (data-budget curve). Every
`--eval-every` steps: held-out pairwise accuracy (trainer/process_rewards.py's definition) and AUC of
beta Σ q vs acc on the held-out mixed groups, and pairwise accuracy on a fixed train subset. Writes
<pool>/prm/<name>.jsonl and, with --save, the trained PRM's weights.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import time

import torch
import torch.nn.functional as F

from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.prm import prm_pairwise_accuracy


def load_pool(pool_dir: pathlib.Path) -> tuple[int, list[dict]]:
    pool = torch.load(pool_dir / "pool.pt")
    return pool["k"], pool["items"]


def groups_of(items: list[dict], k: int, split: str, *, mixed_only: bool) -> list[list[dict]]:
    """Contiguous groups of k responses to one prompt, from `split`; mixed_only keeps 1..k-1 correct."""
    mine = [it for it in items if it["split"] == split]
    groups = [mine[i : i + k] for i in range(0, len(mine), k)]
    if mixed_only:
        groups = [g for g in groups if 0 < sum(it["acc"] for it in g) < k]
    return groups


def padded_batch(
    items: list[dict], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response ids [B, T], attention mask [B, T], next-token targets [B, T-1] and a
    response mask [B, T-1] that marks the positions predicting a response token (EOS included)."""
    seqs = [it["prompt_ids"] + it["response_ids"] for it in items]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    resp = torch.zeros((len(seqs), T - 1), dtype=torch.bool)
    for b, (it, s) in enumerate(zip(items, seqs)):
        ids[b, : len(s)] = torch.tensor(s)
        attn[b, : len(s)] = 1
        resp[b, len(it["prompt_ids"]) - 1 : len(s) - 1] = True
    return ids, attn, ids[:, 1:], resp


def token_logp(model, ids, attn, targets) -> torch.Tensor:
    """log p(target) [B, T-1] at temperature 1 from the full logits."""
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def per_token(model, items: list[dict], pad_id: int, bs: int = 256) -> list[torch.Tensor]:
    """Each response's per-token log-probs under `model` (1-D tensors, response tokens only)."""
    model.eval()
    out = []
    for i in range(0, len(items), bs):
        ids, attn, tgt, resp = padded_batch(items[i : i + bs], pad_id)
        lp = token_logp(model, ids, attn, tgt)
        out += [lp[b][resp[b]] for b in range(len(ids))]
    return out


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """ROC AUC of score vs 0/1 label (ties count one half), by ranks."""
    pos, neg = score[label > 0.5], score[label <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def ranking(score: torch.Tensor, acc: torch.Tensor, k: int) -> dict:
    return {"pairwise": prm_pairwise_accuracy(score, acc, k=k), "auc": auc(score, acc)}


def evaluate(prm, items, ref_lp, pad_id, k, beta) -> dict:
    lp = per_token(prm, items, pad_id)
    q_sum = torch.stack([(a - r).sum() for a, r in zip(lp, ref_lp)])
    acc = torch.tensor([it["acc"] for it in items])
    return {**ranking(beta * q_sum, acc, k), "q_sum_mean": float(q_sum.mean()),
            "q_sum_correct": float(q_sum[acc > 0.5].mean()), "q_sum_wrong": float(q_sum[acc <= 0.5].mean())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", default="runs/prm_offline")
    ap.add_argument("--name", required=True)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128, help="responses per optimizer step (online: 128)")
    ap.add_argument("--max-train", type=int, default=0, help="cap on training responses (0: all)")
    ap.add_argument("--all-groups", action="store_true", help="train on all groups, not only mixed ones")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--max-eval", type=int, default=2000, help="cap on held-out responses evaluated")
    ap.add_argument("--prm-weights", default="", help="start the PRM from these weights instead of sft.pt")
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    pool_dir = pathlib.Path(args.pool)
    k, items = load_pool(pool_dir)
    tok = build_tokenizer()
    pad = tok.pad_token_id
    sft = torch.load(pool_dir / "sft.pt")
    ref = build_tiny_model(tok, seed=0)
    ref.load_state_dict(sft)
    ref.requires_grad_(False)
    prm = build_tiny_model(tok, seed=0)
    prm.load_state_dict(torch.load(args.prm_weights) if args.prm_weights else sft)

    rng = random.Random(args.seed)
    train_groups = groups_of(items, k, "train", mixed_only=not args.all_groups)
    rng.shuffle(train_groups)
    train = [it for g in train_groups for it in g]
    if args.max_train:
        train = train[: args.max_train - args.max_train % k]
    held = [it for g in groups_of(items, k, "heldout", mixed_only=True) for it in g][: args.max_eval]
    probe = [
        it for g in groups_of(items, k, "train", mixed_only=True)[:250] for it in g
    ]  # fixed train subset
    t0 = time.perf_counter()
    ref_train, ref_held, ref_probe = (per_token(ref, x, pad) for x in (train, held, probe))
    print(
        f"{len(train)} train / {len(held)} held-out responses; ref log-probs {time.perf_counter() - t0:.0f} s"
    )

    opt = torch.optim.AdamW(prm.parameters(), lr=args.lr, weight_decay=0.0)
    steps_per_epoch = max(1, len(train) // args.batch)
    total_steps = max(1, round(args.epochs * steps_per_epoch))
    out_dir = pool_dir / "prm"
    out_dir.mkdir(exist_ok=True)
    log_path = out_dir / f"{args.name}.jsonl"
    log_path.write_text("")

    def record(step: int, loss: float, fresh_pairwise: float = float("nan")) -> None:
        rec = {"step": step, "responses_seen": step * args.batch, "train_loss": loss,
               "fresh_batch_pairwise": fresh_pairwise,
               "held": evaluate(prm, held, ref_held, pad, k, args.beta),
               "train_probe": evaluate(prm, probe, ref_probe, pad, k, args.beta),
               "seconds": time.perf_counter() - t0, **{f"arg_{a}": v for a, v in vars(args).items()}}  # fmt: skip
        with log_path.open("a") as log:
            log.write(json.dumps(rec) + "\n")
        h, p = rec["held"], rec["train_probe"]
        print(f"step {step:4d} loss {loss:.4f} held pairwise {h['pairwise']:.3f} auc {h['auc']:.3f} "
              f"(Σq correct {h['q_sum_correct']:+.2f} wrong {h['q_sum_wrong']:+.2f}) | train-probe pairwise "
              f"{p['pairwise']:.3f} | fresh batches {fresh_pairwise:.3f} | {rec['seconds']:.0f} s", flush=True)  # fmt: skip

    record(0, float("nan"))
    order: list[int] = []
    losses, fresh = [], []
    for step in range(1, total_steps + 1):
        if len(order) < args.batch:  # reshuffle groups (kept whole) each epoch
            gidx = list(range(len(train) // k))
            rng.shuffle(gidx)
            order += [g * k + j for g in gidx for j in range(k)]
        idx, order = order[: args.batch], order[args.batch :]
        batch = [train[i] for i in idx]
        prm.train()
        ids, attn, tgt, resp = padded_batch(batch, pad)
        lp = token_logp(prm, ids, attn, tgt)
        ref_pad = torch.zeros_like(lp)
        for b, i in enumerate(idx):
            ref_pad[b][resp[b]] = ref_train[i]
        q_sum = ((lp - ref_pad) * resp).sum(1)
        labels = torch.tensor([it["acc"] for it in batch])
        fresh.append(
            prm_pairwise_accuracy(q_sum.detach(), labels, k=k)
        )  # the online metric: before the update
        loss = F.binary_cross_entropy_with_logits(args.beta * q_sum, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prm.parameters(), 10.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == total_steps:
            fresh_batches = [x for x in fresh if x is not None]
            record(step, sum(losses) / len(losses), sum(fresh_batches) / max(len(fresh_batches), 1))
            losses, fresh = [], []
    if args.save:
        torch.save(prm.state_dict(), out_dir / f"{args.name}.pt")


if __name__ == "__main__":
    main()
