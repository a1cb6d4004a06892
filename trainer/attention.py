"""Attention kernels the trainer may use, and FlashAttention 4 registered with transformers as `fa4`.

GPT-OSS attention adds one learned logit per head, the sink, to each softmax denominator, and every other layer
sees only the last `sliding_window` tokens. A kernel that drops the sink, or computes it forward but not its
backward, trains silently wrong LoRA gradients for q/k/v. FlashAttention 4 (`flash-attn-4`, CuTe DSL) takes the
sinks as `learnable_sink` and differentiates them on Hopper and datacenter Blackwell (compute capability 9.x to
11.x); `fa4_attention_forward` hands it the layer's sinks and window.

The function follows transformers' own flash-attention integration (integrations/flash_attention.py and
modeling_flash_attention_utils.py): transformers' flash mask gives it the 2D padding mask (or None), the padded
batch is unpadded into one token stream with `cu_seqlens` and padded back after the kernel. It always calls the
varlen kernel, so that the path the trainer takes (TRL pads every batch, prompts on the left and completions on
the right) is the one checked, with or without padding. It is registered under its own name: transformers treats
any name containing "flash" as one of its own flash paths, and for `flash_attention_3`/`_4` without the package
it fetches a Hub kernel instead.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

FA4 = "fa4"
AUTO = "auto"
FA4_DISTRIBUTION = "flash-attn-4"
# compute capability majors whose FA4 kernels have the sinks' backward: Hopper (9), datacenter Blackwell (10, 11)
FA4_SINK_BACKWARD_MAJORS = (9, 10, 11)
# the attention implementations checked to keep GPT-OSS's sinks in forward and backward
SINK_MODEL_TYPES = ("gpt_oss",)
SINK_SAFE = ("eager", FA4, AUTO, "flex_attention")
# why others are refused for a model with sinks (name as transformers takes it, without a revision)
SINK_UNSAFE_REASONS = {
    "kernels-community/vllm-flash-attn3": "this Hub kernel computes the sinks forward but has no backward for them "
                                          "(github.com/Dao-AILab/flash-attention/issues/1797), so the LoRA "
                                          "gradients of q/k/v would be silently wrong",
    "flash_attention_3": "without the flash-attn-3 package transformers fetches kernels-community/vllm-flash-attn3, "
                         "whose backward has no gradient for the sinks, so the LoRA gradients of q/k/v would be "
                         "silently wrong",
    "flash_attention_2": "FlashAttention 2 has no sinks: transformers drops them without a word",
    "kernels-community/flash-attn2": "FlashAttention 2 has no sinks: transformers drops them without a word",
    "sdpa": "transformers has no sdpa attention for GPT-OSS",
    "flash_attention_4": "transformers' own FlashAttention 4 path fetches a Hub kernel when flash-attn-4 is not "
                         "installed; fa4 is the trainer's path to the same kernel, with its sink gradients checked",
}


def fa4_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          sliding_window: int | None = None, s_aux: torch.Tensor | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (batch, heads, q_len, dim), key/value (batch, kv_heads, kv_len,
    dim), attention_mask the 2D padding mask (batch, kv_len) or None; returns (batch, q_len, heads, dim)."""
    if dropout:
        raise ValueError(f"ATTN_IMPLEMENTATION={FA4}: FlashAttention 4 has no attention dropout (the model asks "
                         f"for {dropout}): use eager")
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    # the kernels take (tokens, heads, dim)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if attention_mask is None:
        q_lens = torch.full((batch,), q_len, dtype=torch.int32, device=q.device)
        k_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=q.device)
        q_tokens = k_tokens = None
        q = q.reshape(batch * q_len, *q.shape[2:])
        k, v = (t.reshape(batch * kv_len, *t.shape[2:]) for t in (k, v))
    else:
        if q_len != kv_len:  # decoding with a cache: the trainer scores whole sequences only
            raise NotImplementedError(f"ATTN_IMPLEMENTATION={FA4} handles padded batches of whole sequences only "
                                      f"(query length {q_len}, key length {kv_len})")
        # the mask may sit on another GPU than this layer when the layers are spread over several
        keep = attention_mask.to(q.device, torch.bool)
        q_lens = k_lens = keep.sum(dim=-1, dtype=torch.int32)
        q_tokens = k_tokens = keep.flatten().nonzero().flatten()
        q = q.reshape(batch * q_len, *q.shape[2:])[q_tokens]
        k, v = (t.reshape(batch * kv_len, *t.shape[2:])[k_tokens] for t in (k, v))
    window = (sliding_window - 1, 0) if sliding_window else (None, None)  # transformers' window counts the token
    # the kernel launches on the current device: with the layers spread over GPUs that is not always this layer's
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        out = fa4_varlen_kernel()(
            q, k, v,
            cu_seqlens_q=F.pad(q_lens.cumsum(0, dtype=torch.int32), (1, 0)),
            cu_seqlens_k=F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0)),
            max_seqlen_q=q_len if q_tokens is None else int(q_lens.max()),
            max_seqlen_k=kv_len if k_tokens is None else int(k_lens.max()),
            softmax_scale=scaling, causal=True, window_size=window,
            learnable_sink=s_aux)
    out = out[0] if isinstance(out, tuple) else out  # (out, lse)
    if q_tokens is None:
        return out.view(batch, q_len, *out.shape[1:]), None
    padded = out.new_zeros(batch * q_len, *out.shape[1:])  # padding positions: no query, zero output
    padded[q_tokens] = out
    return padded.view(batch, q_len, *out.shape[1:]), None


def fa4_varlen_kernel() -> Callable:
    from flash_attn.cute import flash_attn_varlen_func

    # a CuTe DSL kernel, which torch.compile cannot trace: a compiled layer calls it as it is
    return torch.compiler.disable(flash_attn_varlen_func)


AttentionInterface.register(FA4, fa4_attention_forward)
# Without a mask function of its own name, transformers would hand the attention no padding mask at all.
AttentionMaskInterface.register(FA4, flash_attention_mask)


# ------------------------------------------------------------------ choosing and checking
def fa4_unavailable_reason() -> str | None:
    """Why FA4 cannot train here, or None: the package, a CUDA GPU, and on every visible GPU its sink backward."""
    try:
        importlib.metadata.version(FA4_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return f"the {FA4_DISTRIBUTION} package is not installed (the trainer image has it)"
    if importlib.util.find_spec("flash_attn.cute") is None:
        return f"{FA4_DISTRIBUTION} is installed but flash_attn.cute cannot be found"
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU and none is visible"
    for device in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(device)
        if major not in FA4_SINK_BACKWARD_MAJORS:
            return (f"GPU {device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor}) has no "
                    "FA4 backward for the attention sinks (Hopper or datacenter Blackwell, 9.x to 11.x, has)")
    return None


def resolved_attn_implementation(name: str, torch_dtype: str) -> str:
    """`auto`: FA4 where it can train, else eager."""
    if name != AUTO:
        return name
    return FA4 if torch_dtype == "bfloat16" and fa4_unavailable_reason() is None else "eager"


def attention_problems(name: str, torch_dtype: str, model_type: str | None) -> list[str]:
    """ATTN_IMPLEMENTATION's problems with the model (type None: its config could not be read) and this machine."""
    shown = f"ATTN_IMPLEMENTATION={name!r}"
    problems = []
    base = name.removeprefix("paged|").split("@")[0].split(":")[0]
    if model_type in SINK_MODEL_TYPES and base not in SINK_SAFE:
        reason = SINK_UNSAFE_REASONS.get(base, "not checked to keep the model's attention sinks and their gradients")
        problems.append(f"{shown}: {reason}; the model ({model_type}) has attention sinks: use {FA4} (GPU) or eager")
    if name == FA4:
        reason = fa4_unavailable_reason()
        if reason:
            problems.append(f"{shown}: {reason}: use eager (or {AUTO}: {FA4} where it can run, else eager)")
        if torch_dtype != "bfloat16":
            problems.append(f"{shown} computes in bfloat16 or float16 only, and TORCH_DTYPE={torch_dtype}: set "
                            "TORCH_DTYPE=bfloat16 or use eager")
    return problems
