"""Packed-micro-batch attention on CPU: the dense block-diagonal mask (transformers' sdpa path) against
trainer/attention.py's calls per sequence or prompt group, and against length-padded SDPA (all sequences gathered
into one [S, H, L_max, d] batch: the strategy attention.py had until it measured slower everywhere). Flex attention with a document mask is not in
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

from fastprime.trainer import attention
from fastprime.trainer.attention import packed_causal_attention

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


def run_padded(q, k, v, segments, scale):
    """Plain sequences only: gathered into one [S, H, L_max, d] batch, padding after each sequence's tokens (where
    causal attention never looks from a real query), one is_causal call, rows gathered back."""
    lengths = torch.tensor([L for L, _ in segments])
    L_max = int(lengths.max())
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    col = torch.arange(L_max)
    valid = col[None, :] < lengths[:, None]
    idx = starts[:, None] + torch.minimum(col[None, :], lengths[:, None] - 1)
    batch = lambda x: x[0][:, idx].transpose(0, 1)  # noqa: E731
    out = F.scaled_dot_product_attention(
        batch(q), batch(k), batch(v), is_causal=True, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1)[:, valid][None]


def run_per_segment(q, k, v, segments, scale):
    """attention.py with every prompt group over its mask cap: one call per segment."""
    cap, attention.GROUP_MASK_MAX_TOKENS = attention.GROUP_MASK_MAX_TOKENS, 0
    try:
        return packed_causal_attention(q, k, v, segments, scale=scale)
    finally:
        attention.GROUP_MASK_MAX_TOKENS = cap


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
        # the masks a forward builds once and its layers share (PackedLayout), built here before the timing
        "attention.py": lambda q, k, v, segments, s: packed_causal_attention(
            q, k, v, segments, scale=s, masks=masks
        ),
        "per segment": run_per_segment,
        "padded": run_padded,
    }
    print(f"threads {torch.get_num_threads()}, fwd+bwd ms (min of {args.repeats})\n")
    print("| tokens | segment lengths | segments | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 3) + "|")
    for tokens in (256, 1024, 4096):
        layouts = [
            (f"{lo}-{hi}", [(L, 0) for L in lengths_for(tokens, lo, hi)]) for lo, hi in ((40, 160), (90, 100))
        ]
        if tokens >= 1024:  # groups of 4 responses sharing a prompt; 12 + 10-60: the vs-TRL benchmark's shape
            layouts.append(("12 + 4 x 10-60 shared", shared_for(tokens, 12, 10, 60)))
            layouts.append(("35 + 4 x 20-40 shared", shared_for(tokens, 35, 20, 40)))
        for name, segments in layouts:
            n = sum(L for L, _ in segments)
            g = torch.Generator().manual_seed(0)
            q = torch.randn(1, H, n, D, generator=g)
            k, v = (torch.randn(1, HKV, n, D, generator=g) for _ in range(2))
            plain = all(p == 0 for _, p in segments)
            masks: dict = {}
            packed_causal_attention(q, k, v, segments, scale=1.0, masks=masks)
            ms = [
                None
                if (plain and fn is run_per_segment) or (not plain and fn is run_padded)
                else timed(fn, q, k, v, segments, args.repeats)
                for fn in methods.values()
            ]
            cells = " | ".join("-" if m is None else f"{m:.2f}" for m in ms)
            print(f"| {n} | {name} | {len(segments)} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
