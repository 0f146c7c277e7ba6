"""Model FLOPs of a dense decoder-only transformer from its HF config, and the GPU peaks to divide them by.

The standard count (PaLM, Chowdhery et al. 2022, appendix B; Chinchilla, Hoffmann et al. 2022, appendix F):
per token, a forward costs 2 FLOPs (multiply, add) per weight of every matmul the token goes through

    per layer: attention q, o (D x H*hd each), k, v (D x Hkv*hd each: grouped-query sized); MLP gate, up,
    down (D x I each); once: lm_head (V x D), on the rows the head runs on;

plus attention's own two matmuls against the keys it attends to, QK^T and PV, 2 * H*hd FLOPs each per key:
4 * n_layers * H*hd * context, with context = position + 1 under the causal mask, so a sequence of L tokens
costs 4 * n_layers * H*hd * L(L+1)/2. Packed sequences each count their own L(L+1)/2, not the micro-batch's N^2.
Embedding lookups, biases, norms, RoPE, softmax and activations are left out (O(D) per token, not O(D^2)).
A training step (forward + backward) costs TRAIN_FACTOR = 3 forwards: the backward computes the gradients of
both of a matmul's inputs, twice the forward's work.

These are *model* FLOPs (PaLM's MFU, not HFU): what the model needs, not what the hardware ran. Recomputed
forwards of activation checkpointing, padding, attention entries computed and then masked (a dense-mask SDPA
computes N^2) and a fused head's recomputed logits are not counted, so the utilisation compares across
implementations. A sliding attention window is not modelled (full causal context is counted).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TRAIN_FACTOR = 3  # forward + backward = 3 forwards

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name, first match
# wins (so "H100 PCIe" before "H100"). Sources: NVIDIA H100 Tensor Core GPU Architecture whitepaper (table of
# H100 SXM5 / PCIe specs: peak BF16 tensor 989.4 / 756 TFLOPS dense, twice that with sparsity); the H200 is the
# same GH100 compute at the same clocks (its datasheet's 1,979 TFLOPS is with sparsity), and a GH200's GPU too
# ("GH200" contains "H200"); NVIDIA A100 Tensor Core GPU Architecture whitepaper (BF16 tensor 312 TFLOPS dense,
# SXM4 and PCIe alike). Any other device, CPUs included, has no entry: no MFU is reported rather than a guess.
PEAK_BF16_FLOPS = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", None),  # a different clock and power limit; not in the sources above
    ("H100", 989.4e12),  # SXM5, named "NVIDIA H100 80GB HBM3"
    ("A100", 312e12),
)


def bf16_peak(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device by its name (PEAK_BF16_FLOPS), None when not in the table."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of one CUDA device, else None (CPU, a GPU not in PEAK_BF16_FLOPS).

    The bf16 peak whatever dtype a phase computes in (the trainer's default on CUDA is bf16 mixed precision;
    the HF rollout engine generates in the model's fp32), so an fp32 phase reads as a fraction of bf16 speed."""
    return bf16_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def _field(config, name: str, default=None) -> int:
    value = getattr(config, name, None)
    if value is None:
        value = default
    if value is None:
        raise ValueError(f"model FLOPs: the model config has no {name!r} ({type(config).__name__})")
    return int(value)


def matmul_params(config) -> tuple[int, int]:
    """(weights of every decoder layer's matmuls summed over layers, lm_head weights V*D) of a dense HF config."""
    if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        raise ValueError(
            f"model FLOPs: {type(config).__name__} is a mixture of experts; only dense models count"
        )
    D, layers = _field(config, "hidden_size"), _field(config, "num_hidden_layers")
    H = _field(config, "num_attention_heads")
    Hkv, hd = _field(config, "num_key_value_heads", H), _field(config, "head_dim", D // H)
    I, V = _field(config, "intermediate_size"), _field(config, "vocab_size")
    attention = 2 * D * H * hd + 2 * D * Hkv * hd  # q, o; k, v
    mlp = 3 * D * I  # gate, up, down
    return layers * (attention + mlp), V * D


def attention_width(config) -> int:
    """n_layers * H * hd: a query's QK^T and PV cost 4x this many FLOPs per key it attends to."""
    H = _field(config, "num_attention_heads")
    hd = _field(config, "head_dim", _field(config, "hidden_size") // H)
    return _field(config, "num_hidden_layers") * H * hd


def forward_flops(config, seq_lens: Sequence[int], *, head_tokens: int | None = None) -> int:
    """Model FLOPs of one causal forward over sequences of `seq_lens` tokens (padded or packed alike: each
    sequence attends within itself), the lm_head on `head_tokens` rows (default: every token)."""
    return packed_flops(config, [(n, 0) for n in seq_lens], head_tokens=head_tokens)


def packed_flops(config, segments: Sequence[tuple[int, int]], *, head_tokens: int | None = None) -> int:
    """Model FLOPs of one forward over packed segments (tokens n, prefix p; packing.segments): the body over every
    token, attention from each of a segment's tokens to its p prompt tokens and its causal past, the lm_head on
    `head_tokens` rows (default: every token)."""
    body, head = matmul_params(config)
    tokens = sum(n for n, _ in segments)
    head_tokens = tokens if head_tokens is None else head_tokens
    context = sum(n * p + n * (n + 1) // 2 for n, p in segments)  # causal: token t attends to t + 1 keys
    return 2 * body * tokens + 2 * head * head_tokens + 4 * attention_width(config) * context


def sequence_flops(config, prompt_lens: Sequence[int], response_lens: Sequence[int]) -> int:
    """Model FLOPs of one forward over prompt + response sequences as the trainer runs them: the body over the
    P + R - 1 inputs (the last response token is only a target), the head on the R response positions.

    The same count is the generation of those responses with a KV cache: a prefill over the P prompt tokens
    (head on the last) and one forward per further generated token against its context, R - 1 of them; the
    context lengths are those of the one causal forward. Per sample: the HF engine prefills each prompt once
    per sample (generate repeats it n times); an engine with prefix caching (vLLM) does less, so its count is
    high by at most (n - 1) prompt prefills per prompt."""
    seq_lens = [P + R - 1 for P, R in zip(prompt_lens, response_lens, strict=True)]
    return forward_flops(config, seq_lens, head_tokens=sum(response_lens))
