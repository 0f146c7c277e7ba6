"""Issue 12, part 1: does the trainer's PRM path (packed micro-batches + fused kernel) equal plain PyTorch?

    OMP_NUM_THREADS=1 python benchmarks/prm_pass_crosscheck.py

On demo prompts with worked-solution responses (some with corrupted digits, labelled wrong), a PRM that differs
from the reference (two different random inits) and the demo's micro-batch token budget (512):
1. `logprob_pass` log-probs vs a padded, one-row-per-sequence forward with full logits (packing leakage?);
2. `prm_pass` (update=True, one mini-batch) q and the PRM weights after its AdamW step vs a plain-PyTorch
   BCE(sigmoid(beta Σq), acc) step with the same optimizer settings (gradient scale, sign, clipping).
Prints the largest differences; exit status 1 if any exceeds its tolerance.
"""

from __future__ import annotations

import copy
import random
import sys

import torch
import torch.nn.functional as F

from fastprime.trainer.batch import Batch
from fastprime.trainer.demo import build_tiny_model, build_tokenizer, make_arithmetic_rows
from fastprime.trainer.models import HeadlessLM
from fastprime.trainer.passes import Dist, logprob_pass
from fastprime.trainer.prm import prm_pass

try:
    from prm_offline import padded_batch, token_logp
except ImportError:
    from benchmarks.prm_offline import padded_batch, token_logp


class GradRecorder:
    """Stands in for the optimizer: `prm_pass` clips, then calls step(), which keeps a copy of each gradient."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.grads = model, {}

    def step(self) -> None:
        self.grads = {
            n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None
        }

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)


def demo_batch(tok, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for row in make_arithmetic_rows(n, seed=seed):
        ids = tok.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True)
        ids = list(ids if isinstance(ids, list) else ids["input_ids"])
        sol = row["extra_info"]["solution"]
        acc = 1.0
        if rng.random() < 0.5:  # corrupt one digit: a wrong response
            digits = [i for i, c in enumerate(sol) if c.isdigit()]
            i = rng.choice(digits)
            sol = sol[:i] + str((int(sol[i]) + 1) % 10) + sol[i + 1 :]
            acc = 0.0
        resp = tok(sol, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        items.append({"prompt_ids": ids, "response_ids": resp, "acc": acc})
    return items


def plain_logp(model, items, pad) -> torch.Tensor:
    """[n, T] response log-probs, zero padded, from a right-padded forward with full logits."""
    ids, attn, tgt, resp = padded_batch(items, pad)
    lp = token_logp(model, ids, attn, tgt)
    T = max(len(it["response_ids"]) for it in items)
    out = torch.zeros(len(items), T)
    for b in range(len(items)):
        v = lp[b][resp[b]]
        out[b, : len(v)] = v
    return out


def main() -> int:
    torch.set_num_threads(1)
    tok = build_tokenizer()
    items = demo_batch(tok, 32, seed=3)
    pad = tok.pad_token_id
    ref = build_tiny_model(tok, seed=0)
    prm_plain = build_tiny_model(tok, seed=1)
    prm_fused = HeadlessLM(copy.deepcopy(prm_plain))
    batch = Batch(
        prompts=[it["prompt_ids"] for it in items],
        responses=[it["response_ids"] for it in items],
        acc=torch.tensor([it["acc"] for it in items]),
        truncated=torch.zeros(len(items), dtype=torch.bool),
        k=4,
    )
    d = Dist(rank=0, world=1, device=torch.device("cpu"), token_budget=512)
    mask = batch.mask
    failures = []

    ref_packed, _ = logprob_pass(HeadlessLM(ref), batch, d, temperature=1.0)
    with torch.no_grad():
        ref_pad = plain_logp(ref, items, pad)
    err = float(((ref_packed - ref_pad) * mask).abs().max())
    print(f"1. logprob_pass vs padded forward: max |diff| {err:.2e} over {int(mask.sum())} tokens")
    failures += ["logprob_pass"] if err > 1e-4 else []

    beta = 1.0
    recorder = GradRecorder(prm_fused.lm)
    res = prm_pass(prm_fused, recorder, batch, ref_pad, d, mini_batches=1, beta=beta, temperature=1.0,
                   max_norm=10.0, update=True)  # fmt: skip
    fused = recorder.grads

    def plain_grads(model, dtype):
        model = copy.deepcopy(model).to(dtype)
        q = (plain_logp(model, items, pad).to(dtype) - ref_pad.to(dtype)) * mask
        loss = F.binary_cross_entropy_with_logits(beta * q.sum(1), batch.acc.to(dtype))
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0))
        return q.detach(), float(loss), norm, {n: p.grad for n, p in model.named_parameters()}

    q, loss, norm, g32 = plain_grads(prm_plain, torch.float32)
    _, _, _, g64 = plain_grads(prm_plain, torch.float64)
    q_err = float(((res.q - q) * mask).abs().max())
    print(f"2a. prm_pass q vs plain: max |diff| {q_err:.2e}; loss {res.loss:.6f} vs {loss:.6f}; "
          f"grad norm {res.grad_norm:.4f} vs {norm:.4f}")  # fmt: skip

    def rel_err(g: dict) -> tuple[float, str]:
        # k_proj's bias gets ~0 gradient (a shift under softmax): relative error there is noise over noise
        rel = {
            n: float((g[n].double() - r).norm() / r.norm()) for n, r in g64.items() if r.norm() > 1e-6 * norm
        }
        worst = max(rel, key=rel.get)
        return rel[worst], worst

    g_err, worst = rel_err(fused)
    floor, floor_at = rel_err(g32)
    print(f"2b. clipped PRM gradient vs fp64 autograd, max relative error per tensor: prm_pass {g_err:.2e} "
          f"({worst}); plain fp32 autograd {floor:.2e} ({floor_at})")  # fmt: skip
    failures += ["prm q"] if q_err > 1e-4 else []
    failures += ["prm loss"] if abs(res.loss - loss) > 1e-5 else []
    failures += ["prm grad norm"] if abs(res.grad_norm - norm) > 1e-3 * max(1.0, norm) else []
    failures += ["prm gradient"] if g_err > max(10 * floor, 1e-4) else []
    print("FAILED: " + ", ".join(failures) if failures else "all equal within tolerance")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
