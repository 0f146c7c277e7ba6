"""One GRPO training step (loss forward + backward, DAPO loss, beta > 0), TRL vs FusedGRPOTrainer: time and peak memory.

Run: python benchmarks/bench_grpo_step.py            (CPU shapes; also the GPU shapes when CUDA is there)
     python benchmarks/bench_grpo_step.py --shapes gpu --repeats 5
Variants, each constructed like a user would (model folder, GRPOConfig) and run in its own subprocess:
- `trl`: trl.GRPOTrainer itself. trl >= 1.x scores tokens with its own chunked head (`add_fused_lm_head`:
  [4096 tokens x 32768 vocab] tiles; on CPU every position of the batch is scored, on CUDA only the labelled ones).
- `fused`: fastprime's FusedGRPOTrainer (causal_lm_ppo_loss: chunked on CPU, Triton on CUDA; on-policy, so one
  extra no-grad pass of the fused head gives the old log-probs).
- `eager`: GRPOTrainer scoring from `model(...).logits` ([B, T, V] logits, then log_softmax/gather in fp32),
  what trainers without a fused head do; for scale.
The step is `trainer.compute_loss(model, batch).backward()` on a fixed synthetic batch (prompts, completions of
random lengths, advantages, reference log-probs): generation, rewards and the optimizer are left out, being the
same for every variant. Time: median of --repeats after one warm-up. Peak memory beyond what existed before the
step: `torch.cuda.max_memory_allocated` on CUDA; on CPU the process's peak resident set (ru_maxrss) minus the
resident set before the warm-up step, which is coarse (allocator caching, page reuse) and a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

# Model and batch per shape set: (config overrides for Qwen2Config, B, prompt length, completion length, dtype).
SHAPES = {
    "cpu": dict(
        model=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=32768, tie_word_embeddings=True),
        B=8, P=32, C=224, dtype="float32",
    ),
    # Qwen2.5-0.5B (config.json) with random weights: 16 x 1024 = 16K tokens, the 151936-vocabulary head dominates.
    "gpu": dict(
        model=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                   rope_theta=1000000.0),
        B=16, P=64, C=960, dtype="bfloat16",
    ),
}  # fmt: skip
VARIANTS = ("trl", "fused", "eager")


def save_model(shapes: dict, folder: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastprime.trainer.demo.tokenizer import build_tokenizer

    config = Qwen2Config(max_position_embeddings=4096, attn_implementation="sdpa", **shapes["model"])
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(getattr(torch, shapes["dtype"])).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)


def eager_trainer_class():
    """GRPOTrainer scoring completions from the full `model(...).logits`."""
    from trl import GRPOTrainer

    class EagerLogitsGRPOTrainer(GRPOTrainer):
        def _get_per_token_logps_and_entropies(
            self,
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=None,
            compute_entropy=False,
            **_,
        ):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # unpatched forward
            logp_all = (logits[:, -logits_to_keep - 1 : -1].float() / self.temperature).log_softmax(-1)
            logps = logp_all.gather(-1, input_ids[:, -logits_to_keep:, None])[..., 0]
            entropy = -(logp_all.exp() * logp_all).sum(-1) if compute_entropy else None
            return logps, entropy, None

    return EagerLogitsGRPOTrainer


def synthetic_batch(shapes: dict, vocab: int, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    B, P, C = shapes["B"], shapes["P"], shapes["C"]
    lengths = torch.randint(C // 2, C + 1, (B,), generator=g)
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    batch = dict(
        prompt_ids=torch.randint(0, vocab, (B, P), generator=g),
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        completion_ids=torch.randint(0, vocab, (B, C), generator=g),
        completion_mask=completion_mask,
        advantages=torch.randn(B, generator=g),
        num_items_in_batch=completion_mask.sum(),
        ref_per_token_logps=-5.0 + 0.1 * torch.randn(B, C, generator=g),
    )
    return {k: v.to(device) for k, v in batch.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(variant: str, shape_name: str, folder: str, repeats: int) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from fastprime.kernels.integrations.trl import FusedGRPOTrainer

    shapes, cuda = SHAPES[shape_name], torch.cuda.is_available()
    trainer_class = {"trl": GRPOTrainer, "fused": FusedGRPOTrainer, "eager": eager_trainer_class()}[variant]
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=shapes["B"], num_generations=4,
        max_completion_length=shapes["C"], loss_type="dapo", beta=0.04, use_bias_correction_kl=False,
        bf16=shapes["dtype"] == "bfloat16", use_cpu=not cuda, report_to="none", gradient_checkpointing=False,
    )  # fmt: skip
    trainer = trainer_class(
        model=folder, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
        train_dataset=Dataset.from_dict({"prompt": ["1+1="]}),
    )  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); one micro-batch per step here
    model = trainer.model.train()
    batch = synthetic_batch(shapes, model.config.vocab_size, "cuda" if cuda else "cpu")

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.compute_loss(model, batch).backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times = [step() for _ in range(repeats + 1)][1:]
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return dict(
        variant=variant, shapes=shape_name, tokens=shapes["B"] * (shapes["P"] + shapes["C"]),
        scored=int(batch["completion_mask"].sum()), median_s=statistics.median(times), min_s=min(times),
        peak_gib=max(peak - base, 0) / 2**30, device=torch.cuda.get_device_name() if cuda else "cpu",
        threads=torch.get_num_threads(),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "FOLDER"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print("RESULT " + json.dumps(run_variant(opts.child[0], opts.shapes, opts.child[1], opts.repeats)))
        return
    shape_names = [
        s for s in SHAPES if opts.shapes in (s, "all") and (s == "cpu" or torch.cuda.is_available())
    ]
    print("| shapes | variant | tokens (scored) | median s | min s | peak GiB beyond start | device |")
    print("|---|---|---|---|---|---|---|")
    for shape_name in shape_names:
        with tempfile.TemporaryDirectory() as folder:
            save_model(SHAPES[shape_name], folder)
            for variant in opts.variants.split(","):
                cmd = [sys.executable, __file__, "--shapes", shape_name, "--repeats", str(opts.repeats)]
                proc = subprocess.run([*cmd, "--child", variant, folder], capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"| {shape_name} | {variant} | failed: {last[:200]} | | | | |", flush=True)
                    continue
                r = json.loads(lines[-1][len("RESULT ") :])
                print(
                    f"| {shape_name} | {variant} | {r['tokens']} ({r['scored']}) | {r['median_s']:.3f} | "
                    f"{r['min_s']:.3f} | {r['peak_gib']:.3f} | {r['device']}, {r['threads']} threads |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
