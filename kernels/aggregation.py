"""Per-token loss weights for the three PPO aggregation modes, so that every loss is `Σ_t w_t * term_t`.

Writing the aggregation as explicit weights makes micro-batch accumulation exact: each micro-batch computes its
weights with the *global* normaliser of the whole mini-batch (`num_tokens=` / `num_seqs=`, summed over
micro-batches and ranks by the trainer), and the sum of the micro-batch losses is then the mini-batch loss.

Modes (verl's `agg_loss` names), with m the response mask and len_s the number of valid tokens of sequence s:
- "token-mean":          w_t = m_t / Σ m                        (every valid token counts the same)
- "seq-mean-token-mean": w_t = m_t / (#seqs · len_s)            (every sequence counts the same)
- "seq-mean-token-sum":  w_t = m_t / #seqs                       (every sequence's token sum counts the same)
A token is valid when its mask is non-zero and it belongs to a sequence (seq_id >= 0). A sequence is counted
when it has at least one valid token.
"""

import torch
from torch import Tensor

AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def _check_normaliser(name: str, value: int | float | Tensor | None) -> None:
    if value is None:
        return
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def aggregation_weights(
    response_mask: Tensor,
    seq_ids: Tensor | None = None,
    mode: str = "token-mean",
    *,
    num_tokens: int | float | Tensor | None = None,
    num_seqs: int | float | Tensor | None = None,
) -> Tensor:
    """Per-token weights w (fp32, shaped like `response_mask`) such that the aggregated loss is `Σ_t w_t * term_t`.

    Args:
        response_mask: [N] packed or [B, T] padded; non-zero marks the response tokens that carry loss.
        seq_ids: [N] (or [B, T]) int sequence index of each token, < 0 for tokens of no sequence (padding).
            Optional for [B, T] input, where row b is sequence b.
        mode: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum".
        num_tokens: global number of valid tokens ("token-mean" only), e.g. over all micro-batches and ranks
            of a mini-batch; default: the valid tokens of this input.
        num_seqs: global number of sequences (the "seq-mean-*" modes only); default: the sequences present here.
            A sequence must not be split across micro-batches in "seq-mean-token-mean" (len_s is local).

    Equivalent for [B, T], "seq-mean-token-mean": `m / m.sum(-1, keepdim=True).clamp(min=1) / (m.sum(-1) > 0).sum()`.
    The default normalisers are clamped to >= 1, so an input without valid tokens gets all-zero weights.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"mode must be one of {AGGREGATION_MODES}, got {mode!r}")
    if response_mask.dim() not in (1, 2):
        raise ValueError(f"response_mask must be [N] or [B, T], got shape {tuple(response_mask.shape)}")
    if seq_ids is None:
        if response_mask.dim() != 2:
            raise ValueError("seq_ids is required for packed [N] input")
        B, T = response_mask.shape
        seq_ids = torch.arange(B, device=response_mask.device).unsqueeze(1).expand(B, T)
    if seq_ids.shape != response_mask.shape:
        raise ValueError(
            f"seq_ids shape {tuple(seq_ids.shape)} must equal response_mask shape {tuple(response_mask.shape)}"
        )
    if seq_ids.dtype.is_floating_point or seq_ids.dtype == torch.bool:
        raise ValueError(f"seq_ids must be an integer tensor, got {seq_ids.dtype}")
    if mode == "token-mean" and num_seqs is not None:
        raise ValueError(f"num_seqs={num_seqs} does not apply to mode 'token-mean' (use num_tokens)")
    if mode != "token-mean" and num_tokens is not None:
        raise ValueError(f"num_tokens={num_tokens} does not apply to mode {mode!r} (use num_seqs)")
    _check_normaliser("num_tokens", num_tokens)
    _check_normaliser("num_seqs", num_seqs)

    valid = (response_mask != 0) & (seq_ids >= 0)
    m = valid.to(torch.float32).reshape(-1)
    if mode == "token-mean":
        denom = m.sum().clamp(min=1.0) if num_tokens is None else num_tokens
        return (m / denom).reshape(response_mask.shape)

    # Per-sequence token counts without knowing the number of sequences: bucket tokens by unique id.
    # Invalid tokens go to bucket -1 with weight 0, so they never count towards a sequence.
    ids = torch.where(valid, seq_ids, torch.full_like(seq_ids, -1)).reshape(-1)
    uniq, inverse = torch.unique(ids, return_inverse=True)
    seq_len = torch.zeros(uniq.shape[0], dtype=torch.float32, device=m.device).index_add_(0, inverse, m)
    if num_seqs is None:
        num_seqs = (seq_len > 0).sum().to(torch.float32).clamp(min=1.0)
    if mode == "seq-mean-token-sum":
        w = m / num_seqs
    else:
        w = m / (seq_len[inverse].clamp(min=1.0) * num_seqs)
    return w.reshape(response_mask.shape)
