"""Process group, model loading and FSDP2 wrapping for the policy, the PRM and the frozen reference.

Every model is an HF causal LM inside `HeadlessLM`, whose forward runs the body (`lm.model`) and hands the
final hidden states [N, D] plus the lm_head weight [V, D] to a head function (the fused kernels). Putting the
head inside the FSDP root's forward is what makes the root's parameters (embeddings, final norm, lm_head, tied
or not) unsharded while the kernel reads them; nothing ever computes the full `.logits`.

FSDP2: `fully_shard` per decoder block, then the root; on GPU bf16 compute over fp32 master weights with fp32
gradient reduce, on CPU fp32 throughout. A single process without mixed precision (CPU, or GPU with it off) skips
FSDP: a mesh of one shards nothing, and its hooks, copies and DTensor bookkeeping cost time in every pass.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from fastprime.trainer import attention as packed_attention
from fastprime.trainer.config import Config, SetupError
from fastprime.trainer.liger import apply_body_kernels

# The fused heads return per-token tensors that are views (a reshape of the kernel output); nothing modifies
# them in place, which is the case this FSDP2 warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device): joins torchrun's group (NCCL on GPU, gloo on CPU) or makes a group of one."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(minutes=30)
        if "RANK" in os.environ:  # started by torchrun
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, timeout=timeout)
        else:  # plain `python trainer/main.py`: the same code path with a group of one
            init = f"tcp://127.0.0.1:{_free_port()}"
            dist.init_process_group(backend, init_method=init, rank=0, world_size=1, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    return rank, world, device


class HeadlessLM(nn.Module):
    """An HF causal LM whose forward returns `head(hidden [N, D], lm_head.weight [V, D], lm_head.bias)`.

    logit_scale=True adds a trained scalar s (starting at 1) that multiplies the hidden rows going into the head:
    the logits s * h W^T of a bias-free lm_head (the PRM of prm.logit_scale_lr; with a bias, s leaves it out)."""

    def __init__(self, lm: nn.Module, *, logit_scale: bool = False) -> None:
        super().__init__()
        self.lm = lm
        self.logit_scale = nn.Parameter(torch.ones(1, device=lm.device)) if logit_scale else None

    def forward(
        self, input_ids: Tensor, position_ids: Tensor, head: Callable[..., Any], rows: Tensor | None = None
    ) -> Any:
        """input_ids, position_ids [1, N] packed (packing.py: positions restart at 0 per sequence, at P per further
        response to a shared prompt); rows [M]: these hidden rows go into the head (the positions with a target,
        repeated where responses share a prompt's last token), else all N."""
        kwargs = {}
        if self.lm.config._attn_implementation == packed_attention.NAME:  # segment bounds once, not per layer
            kwargs["packed_layout"] = packed_attention.PackedLayout.from_positions(position_ids)
        out = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)
        lm_head = self.lm.lm_head
        hidden = out.last_hidden_state[0]
        if rows is not None:
            hidden = hidden.index_select(0, rows)
        if self.logit_scale is not None:
            hidden = hidden * self.logit_scale
        return head(hidden, lm_head.weight, getattr(lm_head, "bias", None))


def load_causal_lm(path: str, *, attn_implementation: str = "sdpa") -> nn.Module:
    """fp32 HF causal LM from a local folder (no network)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation, local_files_only=True
    )


def shard_model(
    lm: nn.Module,
    *,
    device: torch.device,
    trainable: bool = True,
    mixed_precision: bool = True,
    activation_checkpointing: bool = False,
    offload: bool = False,
    logit_scale: bool = False,
) -> HeadlessLM:
    """Wrap `lm` in HeadlessLM and apply FSDP2: fully_shard each decoder block, then the root.

    sdpa/eager attention becomes the "fastprime_packed" backend (trainer/attention.py: attention within each
    packed sequence, no dense mask); flash_attention_2 stays (its varlen path needs no mask either).
    mixed_precision applies on CUDA only (bf16 params in compute, fp32 reduce); on CPU everything stays fp32.
    A frozen model (the reference) gets requires_grad=False and eval mode. offload (CUDA only): the shards, their
    gradients and optimizer states stay in CPU memory, copied to the GPU per forward/backward."""
    lm.config.use_cache = False
    lm.zero_grad(
        set_to_none=True
    )  # a warm start leaves its last gradients; FSDP's new parameters drop them too
    if lm.config._attn_implementation in ("sdpa", "eager"):  # their packed path builds a dense [N, N] mask
        lm.config._attn_implementation = packed_attention.register()
    if activation_checkpointing and trainable:
        # transformers 5 renamed gradient_checkpointing_enable (deprecated, removed in v6)
        enable = getattr(lm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.to(device)
    apply_body_kernels(lm, device.type)  # CUDA + liger-kernel installed only
    if not trainable:
        lm.requires_grad_(False)
    model = HeadlessLM(lm, logit_scale=logit_scale)
    mp = None
    if mixed_precision and device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if dist.get_world_size() == 1 and mp is None and not offload:
        # nothing to shard, cast or offload: FSDP would only add hooks and copies
        model.train(trainable)
        return model
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mp is not None:
        kwargs["mp_policy"] = mp
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in lm.model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    model.train(trainable)
    return model


def full_state_dict(model: HeadlessLM) -> dict[str, Tensor]:
    """The unsharded HF state dict (keys as in the HF model) on every rank, on the model device. A collective."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k.removeprefix("lm."): v for k, v in sd.items()}


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (global, not per shard)."""
    return sum(p.numel() for p in model.parameters())


def load_tokenizer_and_model(cfg: Config):
    """(tokenizer, fp32 HF causal LM) of the policy's starting point: the demo's, or from a local folder."""
    if cfg.model.source == "demo":
        from fastprime.trainer.demo import build_tiny_model, build_tokenizer

        tok = build_tokenizer()
        return tok, build_tiny_model(tok, seed=cfg.train.seed)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path, local_files_only=True)
        lm = load_causal_lm(cfg.model.path, attn_implementation=cfg.model.attn_implementation)
    except (OSError, ValueError, ImportError) as e:
        raise SetupError(f"cannot load model.path={cfg.model.path!r}: {e}") from None
    if tok.eos_token_id is None:
        raise SetupError(f"tokenizer of {cfg.model.path!r} has no eos_token: generation could never stop")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, lm


def broadcast_weights(lm: nn.Module, device: torch.device) -> None:
    """Make every rank's copy equal rank 0's (after a warm start that ran on rank 0 only)."""
    if dist.get_world_size() == 1:
        return
    for t in lm.state_dict().values():
        buf = t.to(device)
        dist.broadcast(buf, src=0)
        t.copy_(buf)


def build_models(cfg: Config, lm: nn.Module, device: torch.device) -> dict[str, nn.Module]:
    """The sharded policy (from `lm`), PRM and frozen reference; the PRM and reference only where used.

    The PRM starts from `model.prm_path`, or else (PRIME's default) from the policy's starting weights."""
    use_prm = cfg.algorithm.process_coef != 0
    use_ref = use_prm or cfg.policy.kl_coef > 0
    shard = dict(device=device, mixed_precision=cfg.model.mixed_precision)
    offload = cfg.model.offload  # PRM and reference only: the policy trains every iteration on the GPU
    ckpt = cfg.model.activation_checkpointing
    prm_lm = None
    if use_prm and cfg.model.prm_path:
        try:
            prm_lm = load_causal_lm(cfg.model.prm_path, attn_implementation=cfg.model.attn_implementation)
        except (OSError, ValueError, ImportError) as e:
            raise SetupError(f"cannot load model.prm_path={cfg.model.prm_path!r}: {e}") from None
    elif use_prm:
        prm_lm = copy.deepcopy(lm)
    models = {}
    if use_ref:
        models["ref"] = shard_model(copy.deepcopy(lm), trainable=False, offload=offload, **shard)
    if use_prm:
        trainable = cfg.prm.update != "none"
        scale = trainable and cfg.prm.logit_scale_lr > 0
        models["prm"] = shard_model(
            prm_lm,
            trainable=trainable,
            activation_checkpointing=ckpt,
            offload=offload,
            logit_scale=scale,
            **shard,
        )
    models["policy"] = shard_model(lm, trainable=True, activation_checkpointing=ckpt, **shard)
    return models
