"""A tiny model that scores, for end-to-end tests whose outcome advantages must not all be zero.

The demo Qwen2 and offline tokenizer (trainer/demo/), trained for a few seconds with plain supervised steps to
answer every prompt with `\\boxed{1}` or `\\boxed{2}` (each with probability ~0.47 at temperature 1, measured;
the rest is a malformed answer), then EOS. Each prompt's ground truth is one of the two, so a response is right
about half the time and a group of K responses is mixed with probability ~1 - 2 / 2^K: nonzero leave-one-out
advantages, and groups that pass the filter. A row whose ground truth is anything else (say "3") is never
answered right, so its group always fails. Saved like any HF checkpoint (model + tokenizer), so
`--model.source path --model.path DIR` runs it, with `write_scoring_data`'s JSONL as `--data.train-path`.
"""

from __future__ import annotations

import json
import pathlib
import random

import torch

from fastprime.trainer.data import render_prompt
from fastprime.trainer.demo import build_tiny_model, build_tokenizer

ANSWERS = ("1", "2")
TRAIN_STEPS = 80
BATCH = 32
LR = 3e-3


def scoring_rows(n: int) -> list[dict]:
    """n distinct prompts (plain rows: prompt text, ground truth), ground truths alternating over ANSWERS."""
    return [{"prompt": f"{i}+{i}*3", "ground_truth": ANSWERS[i % 2]} for i in range(n)]


def write_scoring_data(path: pathlib.Path, n: int) -> pathlib.Path:
    """`scoring_rows(n)` as a JSONL data file in the format trainer/data.py reads."""
    path.write_text("".join(json.dumps(r) + "\n" for r in scoring_rows(n)))
    return path


def build_scoring_model(folder: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Train the demo model to answer `\\boxed{1}` or `\\boxed{2}` with about equal probability; save to `folder`."""
    tok = build_tokenizer()
    lm = build_tiny_model(tok, seed=seed)
    rng = random.Random(seed)
    prompts = [render_prompt([{"role": "user", "content": r["prompt"]}], tok) for r in scoring_rows(64)]
    answers = [
        tok(f"\\boxed{{{a}}}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in ANSWERS
    ]
    opt = torch.optim.AdamW(lm.parameters(), lr=LR)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(TRAIN_STEPS):
            # Each drawn prompt with both answers: the loss's minimum is exactly 1/2 each, for every prompt.
            pairs = [(p, a) for p in rng.sample(prompts, BATCH // len(answers)) for a in answers]
            width = max(len(p) + len(a) for p, a in pairs)
            ids = torch.full((BATCH, width), tok.pad_token_id)
            labels = torch.full((BATCH, width), -100)
            for i, (p, a) in enumerate(pairs):  # right padding; loss on the answer tokens only
                ids[i, : len(p) + len(a)] = torch.tensor(p + a)
                labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
            loss = lm(input_ids=ids, attention_mask=ids != tok.pad_token_id, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
