"""Issue 12, part 1, step 1: the demo's SFT checkpoint and a large labelled pool of its samples.

    OMP_NUM_THREADS=1 python benchmarks/prm_offline_pool.py --out runs/prm_offline \
        --train-prompts 2500 --eval-prompts 600 --k 4

Warm-starts the demo's tiny Qwen2 exactly as `trainer/main.py` does (demo rows of seed 0, configs/demo.yaml's
warm-start values, stopped by held-out greedy accuracy), saves it as `sft.pt`, then samples k responses per
prompt at temperature 1 (top_p 1, no top_k, 64 new tokens, as the demo's rollout) from training-split prompts
(for PRM training) and test-split prompts (held out), labels each with the demo's verifier and saves
`pool.pt`: a list of dicts {split, problem, answer, prompt_ids, response_ids, truncated, acc}.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import time

import torch

from fastprime.trainer.config import WarmStartConfig
from fastprime.trainer.demo import build_tiny_model, build_tokenizer, make_arithmetic_rows
from fastprime.trainer.verifiers import VerifierPool
from fastprime.trainer.warmstart import warm_start


def prompt_ids(tok, row: dict) -> list[int]:
    ids = tok.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


@torch.no_grad()
def sample(model, tok, rows: list[dict], *, k: int, seed: int, chunk: int = 64) -> list[dict]:
    """k temperature-1 samples per row, grouped by prompt (row i's samples at i*k..i*k+k-1)."""
    model.eval()
    out = []
    torch.manual_seed(seed)
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        prompts = [prompt_ids(tok, r) for r in part]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(part), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            num_return_sequences=k, max_new_tokens=64, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, use_cache=True,
        )  # fmt: skip
        for j, row in enumerate(gen[:, width:].tolist()):
            stop = next((t for t, x in enumerate(row) if x == tok.eos_token_id), None)
            resp = row[: stop + 1] if stop is not None else row
            r = part[j // k]
            out.append(
                {
                    "problem": r["prompt"][0]["content"],
                    "answer": r["reward_model"]["ground_truth"],
                    "prompt_ids": prompts[j // k],
                    "response_ids": resp,
                    "truncated": stop is None,
                }
            )
    return out


def label(pool, tok, items: list[dict]):
    """Score each sampled item with the demo's verifier, in place (`acc`); returns the VerifyResult."""
    res = pool.score(
        [
            {"ability": "math", "response": tok.decode(it["response_ids"], skip_special_tokens=True),
             "ground_truth": it["answer"]}
            for it in items
        ]
    )  # fmt: skip
    for it, score in zip(items, res.scores):
        it["acc"] = float(score)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/prm_offline")
    ap.add_argument("--train-prompts", type=int, default=2500)
    ap.add_argument("--eval-prompts", type=int, default=600)
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    # The demo's data (trainer/main.py load_data with seed 0): 20000 train rows, 200 held-out eval rows.
    warm_rows = make_arithmetic_rows(20000, seed=0)
    eval_rows = make_arithmetic_rows(200, seed=0, split="test")
    with VerifierPool(workers=1) as pool:
        sft_path = out / "sft.pt"
        model = build_tiny_model(tok, seed=0)
        if sft_path.exists():
            model.load_state_dict(torch.load(sft_path))
        else:
            torch.manual_seed(0)
            cfg = WarmStartConfig(
                lr=2e-3, batch_size=64, eval_every=25, max_seconds=1200, eval_batch_size=200
            )
            ws = warm_start(model, tok, warm_rows, eval_rows, config=cfg, verifier=pool)
            print(
                f"warm start: {ws.steps} steps, {ws.seconds:.0f} s, held-out greedy acc {ws.acc:.3f}",
                flush=True,
            )
            torch.save(model.state_dict(), sft_path)
        # PRM-training prompts: from the training split, different draw from the warm start's rows (seed 1);
        # held-out prompts: the test split (disjoint from every training-split problem by construction).
        train_rows = make_arithmetic_rows(args.train_prompts, seed=1)
        held_rows = make_arithmetic_rows(args.eval_prompts, seed=1, split="test")
        t0 = time.perf_counter()
        items = []
        for split, rows in (("train", train_rows), ("heldout", held_rows)):
            got = sample(model, tok, rows, k=args.k, seed=1 if split == "train" else 2)
            for g in got:
                g["split"] = split
            items += got
            print(f"sampled {len(got)} {split} responses, {time.perf_counter() - t0:.0f} s", flush=True)
        res = label(pool, tok, items)
        print(
            f"verified in {time.perf_counter() - t0:.0f} s total; failures {dict(res.failures)}", flush=True
        )
    torch.save({"k": args.k, "items": items}, out / "pool.pt")
    for split in ("train", "heldout"):
        acc = torch.tensor([it["acc"] for it in items if it["split"] == split]).view(-1, args.k)
        mixed = ((acc.sum(1) > 0) & (acc.sum(1) < args.k)).float().mean()
        print(f"{split}: {acc.numel()} responses, sample acc {acc.mean():.3f}, mixed groups {mixed:.3f}")


if __name__ == "__main__":
    main()
