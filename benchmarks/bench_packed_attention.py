"""Packed-micro-batch attention on CPU: the dense block-diagonal mask (transformers' sdpa path) against
per-sequence SDPA and length-padded SDPA (trainer/attention.py). Flex attention with a document mask is not in
the table: in torch 2.13 it has no backward on CPU ("FlexAttention does not support backward on CPU").

Run: OMP_NUM_THREADS=1 python benchmarks/bench_packed_attention.py [--repeats 7]
Prints a markdown table of forward+backward milliseconds (min over repeats: the machine may be shared) for the
demo model's attention shape (4 query / 2 KV heads of 32) at several micro-batch sizes and length mixes.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from fastprime.trainer.attention import choose_strategy, packed_causal_attention

H, HKV, D = 4, 2, 32


def dense_mask(lengths: list[int]) -> torch.Tensor:
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    n = seg.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return (causal & (seg[:, None] == seg[None, :]))[None, None]


def run_dense(q, k, v, lengths, scale):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=dense_mask(lengths), scale=scale, enable_gqa=True
    )


def timed(fn, q, k, v, lengths, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        t0 = time.perf_counter()
        out = fn(qq, kk, vv, lengths, D**-0.5)
        out.sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def lengths_for(tokens: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    rng, out = random.Random(seed), []
    while sum(out) + lo <= tokens:
        out.append(min(rng.randint(lo, hi), tokens - sum(out)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    methods = {
        "dense mask": run_dense,
        "per-sequence": lambda q, k, v, L, s: packed_causal_attention(
            q, k, v, L, scale=s, strategy="per_sequence"
        ),
        "padded": lambda q, k, v, L, s: packed_causal_attention(q, k, v, L, scale=s, strategy="padded"),
    }
    print(f"threads {torch.get_num_threads()}, fwd+bwd ms (min of {args.repeats})\n")
    print("| tokens | seq lengths | seqs | " + " | ".join(methods) + " | auto picks |")
    print("|---" * (len(methods) + 4) + "|")
    for tokens in (256, 1024, 4096):
        for lo, hi in ((40, 160), (90, 100)):
            lengths = lengths_for(tokens, lo, hi)
            n = sum(lengths)
            g = torch.Generator().manual_seed(0)
            q = torch.randn(1, H, n, D, generator=g)
            k, v = (torch.randn(1, HKV, n, D, generator=g) for _ in range(2))
            ms = [timed(fn, q, k, v, lengths, args.repeats) for fn in methods.values()]
            cells = " | ".join(f"{m:.2f}" for m in ms)
            print(f"| {n} | {lo}-{hi} | {len(lengths)} | {cells} | {choose_strategy(lengths)} |", flush=True)


if __name__ == "__main__":
    main()
