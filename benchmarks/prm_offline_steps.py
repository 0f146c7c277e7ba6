"""Issue 12, part 1, step 3: does a trained implicit PRM's token reward drop where a wrong response goes wrong?

    OMP_NUM_THREADS=1 python benchmarks/prm_offline_steps.py --pool runs/prm_offline \
        --prm runs/prm_offline/prm/NAME.pt [--prm OTHER.pt ...] --plot benchmarks/results/prm_offline_steps.png

The demo's worked solution is deterministic (trainer/demo/task.py format_solution), and its tokenizer has one
token per character, so a wrong response's first mistake is the first token where it departs from the worked
solution: everything before it is a correct prefix, and the line holding it is the first wrong line (a wrong
result digit after '=', or a wrong operand / operator copied from the problem, or a wrong boxed answer).
For each held-out wrong response this compares the PRM's q = logp_prm - logp_ref on that token and that line
with q on the correct lines before it; the SFT model's own log-prob on the same tokens is the trivial baseline.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch

from fastprime.trainer.demo import build_tiny_model, build_tokenizer
from fastprime.trainer.demo.task import format_solution

try:  # run as a script from the repository root or as a module
    from prm_offline import load_pool, per_token
except ImportError:
    from benchmarks.prm_offline import load_pool, per_token

import re

WINDOW = 8  # tokens either side of the first wrong token in the position profile


def gold_solution(problem: str) -> str:
    """The worked solution of a demo problem: strip the parentheses, read the (op, operand) chain in order."""
    flat = problem.replace("(", "").replace(")", "")
    start = int(re.match(r"\d+", flat).group())
    steps = [(op, int(x)) for op, x in re.findall(r"([+\-*])(\d+)", flat)]
    return format_solution(start, steps)[0]


def first_mistake(tok, item: dict) -> dict | None:
    """Where a wrong response first departs from the worked solution (token index, line, kind), or None."""
    ids = item["response_ids"][:-1] if not item["truncated"] else item["response_ids"]
    chars = [tok.decode([i]) for i in ids]
    if any(len(c) != 1 for c in chars):  # not one character per token: skip rather than misalign
        return None
    text, gold = "".join(chars), gold_solution(item["problem"]) + tok.eos_token
    t = next((i for i, (a, b) in enumerate(zip(text, gold)) if a != b), min(len(text), len(gold)))
    if t >= len(item["response_ids"]):
        return None
    line_of = [text[:i].count("\n") for i in range(len(text) + 1)]
    line = line_of[min(t, len(text))]
    line_start = text.rfind("\n", 0, t) + 1
    kind = "boxed" if "boxed" in gold[line_start : line_start + 7] else (
        "result digit" if "=" in text[line_start:t] else "operand/operator")  # fmt: skip
    return {"token": t, "line": line, "line_start": line_start, "kind": kind, "line_of": line_of}


def profile(values: list[torch.Tensor], mistakes: list[dict]) -> dict:
    """Means over wrong responses of the per-token value at the first wrong token, on the correct prefix lines,
    on the whole first wrong line, and the position profile around the first wrong token."""
    at, prefix_lines, wrong_line, drop, prof, prof_n = (
        [],
        [],
        [],
        [],
        [0.0] * (2 * WINDOW + 1),
        [0] * (2 * WINDOW + 1),
    )
    for v, m in zip(values, mistakes):
        t, ls = m["token"], m["line_start"]
        at.append(float(v[t]))
        line_end = next(
            (i for i in range(t, len(v)) if i < len(m["line_of"]) - 1 and m["line_of"][i + 1] > m["line"]),
            len(v),
        )
        wl = float(v[ls : line_end + 1].mean())
        wrong_line.append(wl)
        if ls > 0:
            pl = float(v[:ls].mean())
            prefix_lines.append(pl)
            drop.append(wl < pl)
        for d in range(-WINDOW, WINDOW + 1):
            if 0 <= t + d < len(v):
                prof[d + WINDOW] += float(v[t + d])
                prof_n[d + WINDOW] += 1
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return {
        "n": len(at), "n_with_prefix": len(prefix_lines), "at_first_wrong_token": mean(at),
        "first_wrong_line": mean(wrong_line), "correct_lines_before": mean(prefix_lines),
        "frac_line_drops": mean([float(x) for x in drop]),
        "profile": [p / max(n, 1) for p, n in zip(prof, prof_n)],
    }  # fmt: skip


BINS = (-99.0, -3.0, -2.0, -1.0, -0.5, -0.1)


def matched_by_ref_logp(q_wrong, ref_wrong, mistakes, q_right, ref_right) -> list[dict]:
    """Mean q at first wrong tokens vs at tokens of correct responses whose reference log-prob is in the same
    bin: if the PRM only sharpened the reference (q a function of logp_ref), the two would be equal."""
    at_q = torch.tensor([float(q[m["token"]]) for q, m in zip(q_wrong, mistakes)])
    at_r = torch.tensor([float(r[m["token"]]) for r, m in zip(ref_wrong, mistakes)])
    all_q, all_r = torch.cat(q_right), torch.cat(ref_right)
    rows = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        w, c = (at_r >= lo) & (at_r < hi), (all_r >= lo) & (all_r < hi)
        if w.sum() >= 5 and c.sum() >= 5:
            rows.append({"ref_logp_bin": [lo, hi], "n_wrong": int(w.sum()), "q_first_wrong": float(at_q[w].mean()),
                         "n_correct": int(c.sum()), "q_correct_resp": float(all_q[c].mean())})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", default="runs/prm_offline")
    ap.add_argument("--prm", action="append", default=[], help="trained PRM weights (.pt), repeatable")
    ap.add_argument("--max-wrong", type=int, default=1500)
    ap.add_argument("--plot", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pool_dir = pathlib.Path(args.pool)
    k, items = load_pool(pool_dir)
    tok = build_tokenizer()
    wrong = [it for it in items if it["split"] == "heldout" and it["acc"] < 0.5]
    pairs = [(it, first_mistake(tok, it)) for it in wrong]
    pairs = [(it, m) for it, m in pairs if m is not None][: args.max_wrong]
    items_w, mistakes = [p[0] for p in pairs], [p[1] for p in pairs]
    kinds = {}
    for m in mistakes:
        kinds[m["kind"]] = kinds.get(m["kind"], 0) + 1
    print(f"{len(items_w)} held-out wrong responses; first mistake: {kinds}")
    ref = build_tiny_model(tok, seed=0)
    ref.load_state_dict(torch.load(pool_dir / "sft.pt"))
    ref_lp = per_token(ref, items_w, tok.pad_token_id)
    results = {"kinds": kinds, "sft_logp": profile(ref_lp, mistakes)}
    right = [it for it in items if it["split"] == "heldout" and it["acc"] > 0.5][: args.max_wrong]
    ref_right = per_token(ref, right, tok.pad_token_id)
    matched = {}
    for path in args.prm:
        prm = build_tiny_model(tok, seed=0)
        prm.load_state_dict(torch.load(path))
        lp = per_token(prm, items_w, tok.pad_token_id)
        q_wrong = [a - r for a, r in zip(lp, ref_lp)]
        results[pathlib.Path(path).stem] = profile(q_wrong, mistakes)
        q_right = [a - r for a, r in zip(per_token(prm, right, tok.pad_token_id), ref_right)]
        matched[pathlib.Path(path).stem] = matched_by_ref_logp(q_wrong, ref_lp, mistakes, q_right, ref_right)
    for name, r in results.items():
        if name != "kinds":
            print(f"{name}: at first wrong token {r['at_first_wrong_token']:+.4f}, first wrong line "
                  f"{r['first_wrong_line']:+.4f}, correct lines before {r['correct_lines_before']:+.4f}, "
                  f"line drops in {r['frac_line_drops']:.2f} of {r['n_with_prefix']}")  # fmt: skip
    for name, rows in matched.items():
        for r in rows:
            print(f"{name}: ref logp in {r['ref_logp_bin']}: q at first wrong token {r['q_first_wrong']:+.3f} "
                  f"(n={r['n_wrong']}) vs q on correct responses' tokens {r['q_correct_resp']:+.3f} (n={r['n_correct']})")  # fmt: skip
    results["matched_by_ref_logp"] = matched
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [n for n in results if n not in ("kinds", "sft_logp", "matched_by_ref_logp")]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        xs = list(range(-WINDOW, WINDOW + 1))
        axes[0].plot(xs, results["sft_logp"]["profile"], marker="o")
        axes[0].set_title("SFT (reference) log-prob of the sampled token")
        for n in names:
            axes[1].plot(xs, results[n]["profile"], marker="o", label=n)
        axes[1].set_title("PRM token reward q = logp_prm - logp_ref")
        for ax in axes:
            ax.axvline(0, color="grey", ls="--")
            ax.set_xlabel("token position relative to the first wrong token")
        axes[1].legend(fontsize=7)
        fig.suptitle(f"held-out wrong responses (n={len(items_w)}), demo task")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=90)


if __name__ == "__main__":
    main()
