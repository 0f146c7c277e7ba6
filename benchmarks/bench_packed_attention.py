"""Packed-micro-batch attention on CPU: the dense block-diagonal mask (transformers' sdpa path) against
per-sequence SDPA and length-padded SDPA (trainer/attention.py). Flex attention with a document mask is not in
the table: in torch 2.13 it has no backward on CPU ("FlexAttention does not support backward on CPU").

Run: OMP_NUM_THREADS=1 python benchmarks/bench_packed_attention.py [--repeats 7]
Prints a markdown table of forward+backward milliseconds (min over repeats: the machine may be shared) for the
demo model's attention shape (4 query / 2 KV heads of 32) at several micro-batch sizes and length mixes, plain
sequences and responses sharing a packed prompt (trainer/packing.py).
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from fastprime.trainer.attention import choose_strategy, packed_causal_attention

H, HKV, D = 4, 2, 32


def dense_mask(segments: list[tuple[int, int]]) -> torch.Tensor:
    """[1, 1, N, N]: each token sees its own segment's causal past and, in a continuation, its prompt's first p."""
    n = sum(L for L, _ in segments)
    mask = torch.zeros(n, n, dtype=torch.bool)
    start = root = 0
    for L, p in segments:
        root = start if p == 0 else root
        mask[start : start + L, start : start + L] = torch.ones(L, L, dtype=torch.bool).tril()
        mask[start : start + L, root : root + p] = True
        start += L
    return mask[None, None]


def run_dense(q, k, v, segments, scale):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=dense_mask(segments), scale=scale, enable_gqa=True
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


def shared_for(
    tokens: int, prompt: int, lo: int, hi: int, k: int = 4, seed: int = 0
) -> list[tuple[int, int]]:
    """Groups as the trainer packs a rollout's samples: a prompt with its first response, k - 1 continuations."""
    rng, out = random.Random(seed), []
    while sum(L for L, _ in out) + prompt + k * hi <= tokens:
        out.append((prompt + rng.randint(lo, hi), 0))
        out += [(rng.randint(lo, hi), prompt) for _ in range(k - 1)]
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
    print("| tokens | segment lengths | segments | " + " | ".join(methods) + " | auto picks |")
    print("|---" * (len(methods) + 4) + "|")
    for tokens in (256, 1024, 4096):
        layouts = [
            (f"{lo}-{hi}", [(L, 0) for L in lengths_for(tokens, lo, hi)]) for lo, hi in ((40, 160), (90, 100))
        ]
        if tokens >= 1024:  # the vs-TRL benchmark's shape: 4 samples of ~30 tokens after a ~35-token prompt
            layouts.append(("35 + 4 x 20-40 shared", shared_for(tokens, 35, 20, 40)))
        for name, segments in layouts:
            n = sum(L for L, _ in segments)
            g = torch.Generator().manual_seed(0)
            q = torch.randn(1, H, n, D, generator=g)
            k, v = (torch.randn(1, HKV, n, D, generator=g) for _ in range(2))
            ms = [timed(fn, q, k, v, segments, args.repeats) for fn in methods.values()]
            cells = " | ".join(f"{m:.2f}" for m in ms)
            print(f"| {n} | {name} | {len(segments)} | {cells} | {choose_strategy(segments)} |", flush=True)


if __name__ == "__main__":
    main()
