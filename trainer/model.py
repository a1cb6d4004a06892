"""Load the policy for training: bf16 weights (an MXFP4 checkpoint's experts kept in MXFP4, or dequantized), on
the GPUs within a budget."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import attention  # importing it registers ATTN_IMPLEMENTATION=fa4 with transformers
from . import experts  # and this the lean experts forward
from . import fused_experts  # noqa: F401  (and this the fused one: EXPERTS_FORWARD)
from .config import SettingsError

log = logging.getLogger(__name__)


def load_tokenizer(model_name: str):
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    tokenizer.padding_side = "left"  # TRL pads prompts on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_name: str, dtype: str, attn_implementation: str, gpu_memory_budget_gib: float,
               gradient_checkpointing: bool, for_ranks: bool = False, experts_format: str = "auto",
               experts_forward: str = "lean"):
    """For trainer ranks, the whole model in host memory: FSDP2 then takes it to the rank's GPU one decoder layer
    at a time, keeping only the rank's shard (ranks.shard_frozen_base), so no GPU ever holds the whole model beside
    the server. For one trainer process, its layers spread over the visible GPUs within the budget.

    An MXFP4 checkpoint's experts stay MXFP4 (`experts_format` auto or mxfp4; trainer/experts.py), dequantized
    inside each layer's forward: the model is then small enough for one GPU and for every rank to hold it whole
    (ranks.shard_frozen_base keeps it whole). With `bf16` they are dequantized at load, as before."""
    attn_implementation = attention.resolved_attn_implementation(attn_implementation, dtype)  # `auto` from any caller
    if not for_ranks and attn_implementation == "flex_attention" and torch.cuda.device_count() > 1:
        # seen on 2 x H100 with transformers 5.17: its padding mask stays on the first GPU, and Inductor cannot
        # lower the flex kernel of a layer on the second ("Buffers cannot be created while lowering a pointwise
        # subgraph"); the first micro-step fails after a whole generation
        raise SettingsError("ATTN_IMPLEMENTATION=flex_attention fails with the model's layers spread over several "
                            "GPUs (transformers builds its mask on the first): use eager")
    config = AutoConfig.from_pretrained(model_name)
    kwargs = {"dtype": getattr(torch, dtype), "attn_implementation": attn_implementation}
    mxfp4 = is_mxfp4_checkpoint(config)
    if experts_format == "mxfp4" and not mxfp4:
        raise SettingsError(f"EXPERTS_FORMAT=mxfp4: {model_name} is not an MXFP4 checkpoint; use auto")
    keep_mxfp4 = mxfp4 and experts_format in ("auto", "mxfp4")
    if mxfp4:
        from transformers import Mxfp4Config
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)  # LoRA trains on bf16 weights
    if for_ranks or keep_mxfp4:
        # each rank reads it: host memory for one bf16 copy per rank; MXFP4 experts go to the GPU once converted
        kwargs["device_map"] = {"": "cpu"}
    elif torch.cuda.is_available():
        kwargs["device_map"] = "balanced"  # half the layers per GPU, beside the TP=2 server's halves
        kwargs["max_memory"] = {i: f"{gpu_memory_budget_gib}GiB" for i in range(torch.cuda.device_count())}
    model = AutoModelForCausalLM.from_pretrained(model_name, **kwargs)
    model.config.use_cache = not gradient_checkpointing
    if mxfp4 and not keep_mxfp4:
        # transformers dequantizes to bf16 whatever the dtype asked: a float32 model would compute its experts in
        # bf16 (its grouped GEMM casts the input to the weights' dtype)
        for _, module in experts.experts_modules(model):
            for proj in experts.PROJECTIONS:
                getattr(module, proj).data = getattr(module, proj).data.to(kwargs["dtype"])
    if keep_mxfp4:
        experts.keep_experts_mxfp4(model, model_name, kwargs["dtype"])
        if torch.cuda.is_available() and not for_ranks:
            device = torch.device("cuda", torch.cuda.current_device())
            model.to(device)  # the whole model fits one GPU
            model.hf_device_map = {"": device.index}
        experts.check_kernel_against_reference(model)
    if experts.use_experts_forward(model, experts_forward):
        log.info("experts: the %s forward (EXPERTS_FORWARD)", experts_forward)
    log.info("loaded %s (%s, attention %s)%s", model_name, dtype, attn_implementation,
             f" over {sorted(set(model.hf_device_map.values()))}" if hasattr(model, "hf_device_map") else "")
    return model


def is_mxfp4_checkpoint(config) -> bool:
    quantization = getattr(config, "quantization_config", None) or {}
    return isinstance(quantization, dict) and quantization.get("quant_method") == "mxfp4"


def output_head_device_guard(model):
    """Make the LM head's GPU the current CUDA device while TRL scores tokens. TRL's fused LM head launches its
    Triton kernel on the current device, not on its tensors' (it has no device guard); with the layers spread over
    two GPUs the head sits on the second while the first is current, and the logprobs came out wrong by nats
    (BENCHMARKS.md, "Do vLLM and the trainer compute the same policy?"). Guarding the launch by the tensors' device is the fix other
    Triton kernel libraries made for models spread by `device_map`."""
    head = model.get_output_embeddings().weight.device
    return torch.cuda.device(head) if head.type == "cuda" else nullcontext()


def lora_config(rank: int, alpha: int, dropout: float, target_modules: tuple[str, ...]) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      bias="none", task_type="CAUSAL_LM")


def lora_target_problems(model_config, target_modules: tuple[str, ...]) -> list[str]:
    """Each LORA_TARGET_MODULES name must match a module LoRA can wrap, in the model built from its config on the
    meta device (no memory taken, no weights read), before the server is waited for."""
    from accelerate import init_empty_weights
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers.pytorch_utils import Conv1D

    # the module types PEFT's LoRA dispatches on; a name that matches only others fails inside PEFT
    wrappable_types = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                       torch.nn.MultiheadAttention, Conv1D)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config)
    modules = {name: module for name, module in model.named_modules() if name}
    wrappable = sorted({name.rsplit(".", 1)[-1] for name, module in modules.items()
                        if isinstance(module, wrappable_types)})
    problems = []
    for target in target_modules:
        config = LoraConfig(target_modules=[target])
        matched = [module for name, module in modules.items() if check_target_module_exists(config, name)]
        if not matched:
            problems.append(f"LORA_TARGET_MODULES: {target!r} matches no module of the model; names LoRA can wrap: "
                            f"{', '.join(wrappable[:20])}")
        elif not any(isinstance(m, wrappable_types) for m in matched):
            kinds = ", ".join(sorted({type(m).__name__ for m in matched}))
            problems.append(f"LORA_TARGET_MODULES: {target!r} names {kinds} modules, which LoRA cannot wrap; "
                            f"names it can: {', '.join(wrappable[:20])}")
    return problems
